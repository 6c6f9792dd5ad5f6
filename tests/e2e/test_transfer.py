"""Chunked transfer: resume after kill -9, corrupt chunks, broker memory."""

from __future__ import annotations

import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import tomli_w
from edgefleet_proto import artifact_pb2
from edgefleet_proto.codec import decode_as, encode

from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker
from tests.support.localfleet import Controller, register_agent, rollout_done
from tests.support.models import dense_of_size, digits_classifier
from tests.support.mqtt_peer import Peer
from tests.support.waiting import wait_until


class RequestLog:
    """Every chunk index a device asks the controller for, seen from the broker."""

    def __init__(self, controller: Controller, broker: Broker, device_id: str) -> None:
        self.indices: list[int] = []
        self._lock = threading.Lock()
        self.peer = Peer(broker.port, "test-observer", broker.add_tool_user("test-observer"))
        self.peer.on_message = self._record
        self.peer.subscribe(f"edgefleet/v1/devices/{device_id}/artifact/request")

    def _record(self, message: Any) -> None:
        request = decode_as(artifact_pb2.ChunkRequest, message.payload)
        with self._lock:
            self.indices.extend(request.indices)

    def count(self) -> int:
        with self._lock:
            return len(self.indices)

    def take(self) -> list[int]:
        with self._lock:
            taken, self.indices = self.indices, []
            return taken


class BrokerMemory:
    """Samples mosquitto's resident memory in the background; stop() gives the peak growth."""

    def __init__(self, broker: Broker) -> None:
        assert broker.proc is not None
        self._proc = psutil.Process(broker.proc.pid)
        self._start = self._proc.memory_info().rss
        self._peak = self._start
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(0.005):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return self._peak - self._start


@pytest.fixture
def unicast_controller(broker: Broker, tmp_path: Path) -> Iterator[Controller]:
    """A controller that sends artifacts only on each device's own requests.

    The default wave broadcast would bring the whole model before the device asks for a
    chunk; these tests are about the requests: windows, resume from disk, a chunk fetched again.
    (tests/e2e/test_wave_broadcast.py covers the broadcast and its repair by requests.)
    """
    c = Controller(
        tmp_path / "controller",
        broker.port,
        passwd_file=broker.passwd_file,
        reload_command=broker.reload_command,
    )
    c.init()
    settings = c.data_dir / "controller.toml"
    doc = tomllib.loads(settings.read_text())
    doc["artifact_delivery"] = "unicast"
    settings.write_text(tomli_w.dumps(doc))
    c.start()
    try:
        yield c
    finally:
        c.stop()


def upload(controller: Controller, path: Path, name: str, version: str) -> dict[str, Any]:
    body: dict[str, Any] = controller.cli("models", "upload", str(path), "--name", name, "--version", version)
    return body


def test_kill_mid_download_resumes_from_chunks_on_disk(
    broker: Broker, unicast_controller: Controller, agents: list[AgentProcess], tmp_path: Path
) -> None:
    controller = unicast_controller
    big = upload(controller, dense_of_size(tmp_path / "big.onnx", 20), "big", "1")
    chunks = -(-big["size"] // 65536)
    agent = register_agent(controller, tmp_path / "agents", "dev-r")
    agents.append(agent.start())
    wait_until(lambda: controller.cli("devices", "list")[0]["online"], 30, "agent online")
    requests = RequestLog(controller, broker, "dev-r")
    rss = BrokerMemory(broker)
    rollout = controller.cli("rollouts", "create", "--model", "big", "--version", "1", "--device", "dev-r")

    def partway() -> bool:
        return requests.count() >= chunks // 4

    wait_until(partway, 60, "a quarter of the download requested", interval=0.005)
    agent.kill()
    before_kill = set(requests.take())
    assert len(before_kill) < chunks, "killed before the download finished"
    part_files = list(agent.data_dir.rglob("*.part"))
    assert part_files, "the agent keeps its partial download on disk"
    # Flip bytes inside chunk 0, which it had: re-hashing on start must catch it.
    with part_files[0].open("r+b") as f:
        f.seek(100)
        f.write(b"\xde\xad\xbe\xef" * 16)

    agent.start()
    final = wait_until(lambda: rollout_done(controller, rollout["id"]), 120, "the rollout to finish")
    assert final["status"] == "succeeded", final
    after_restart = requests.take()
    requests.peer.close()
    # It asked again only for what it did not have: at most the window lost in flight.
    assert len(after_restart) < chunks - len(before_kill) + 16, (len(after_restart), len(before_kill), chunks)
    assert before_kill | set(after_restart) == set(range(chunks))
    assert 0 in after_restart, "the chunk corrupted on disk was found by re-hashing and fetched again"
    # The broker never held the 20 MB model: chunks flow through a small window.
    assert rss.stop() < 12 * 1024 * 1024


def test_corrupt_chunk_in_flight_is_rejected_and_fetched_again(
    broker: Broker, unicast_controller: Controller, agents: list[AgentProcess], tmp_path: Path
) -> None:
    controller = unicast_controller
    big = upload(controller, dense_of_size(tmp_path / "big.onnx", 8), "big", "1")
    agent = register_agent(controller, tmp_path / "agents", "dev-c")
    agents.append(agent.start())
    wait_until(lambda: controller.cli("devices", "list")[0]["online"], 30, "agent online")
    forger = Peer(broker.port, "test-forger", broker.add_tool_user("test-forger"))
    requests = RequestLog(controller, broker, "dev-c")
    rollout = controller.cli("rollouts", "create", "--model", "big", "--version", "1", "--device", "dev-c")
    wait_until(lambda: requests.count() > 0, 60, "download under way", interval=0.005)

    # In flight: the last chunk, not yet asked for, with bytes that do not match the manifest.
    last = -(-big["size"] // 65536) - 1
    forged = artifact_pb2.ArtifactResponse(
        chunk=artifact_pb2.Chunk(
            digest=big["digest"], index=last, offset=last * 65536, data=b"\x00" * (big["size"] - last * 65536)
        )
    )
    assert not forger.publish("edgefleet/v1/devices/dev-c/artifact/response", encode(forged)).is_failure
    forger.close()

    def rejected() -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = controller.cli("events", "dev-c", "--limit", "200")
        return [e for e in events if e["kind"] == "chunk_rejected"]

    event = wait_until(rejected, 30, "the agent to report the corrupt chunk")[0]
    assert event["attributes"]["index"] == str(last)

    final = wait_until(lambda: rollout_done(controller, rollout["id"]), 120, "the rollout to finish")
    assert final["status"] == "succeeded", final
    requests.peer.close()
    installed = list((agent.data_dir / "models").glob(f"{big['digest']}*"))
    assert installed, "the verified model is installed under its digest"


def test_model_that_does_not_match_its_digest_is_refused_and_previous_kept(
    broker: Broker, controller: Controller, agents: list[AgentProcess], tmp_path: Path
) -> None:
    digits = digits_classifier(tmp_path / "digits.onnx")
    v1 = upload(controller, digits.path, "digits", "1")
    v2 = upload(controller, digits_classifier(tmp_path / "digits2.onnx", max_iter=50).path, "digits", "2")
    agent = register_agent(controller, tmp_path / "agents", "dev-d")
    agents.append(agent.start())
    first = controller.cli("rollouts", "create", "--model", "digits", "--version", "1", "--device", "dev-d")
    assert (
        wait_until(lambda: rollout_done(controller, first["id"]), 60, "v1 rollout")["status"] == "succeeded"
    )

    # Bit rot in the controller's store: every byte it serves for v2 is now wrong.
    stored = next(
        p for p in (controller.data_dir / "artifacts").rglob("*") if p.name.startswith(v2["digest"])
    )
    stored.write_bytes(bytes(b ^ 0xFF for b in stored.read_bytes()))
    second = controller.cli("rollouts", "create", "--model", "digits", "--version", "2", "--device", "dev-d")
    final = wait_until(lambda: rollout_done(controller, second["id"]), 120, "v2 rollout to fail")
    assert final["status"] == "failed"
    assert final["devices"][0]["detail"], "the failure names its reason"
    response = agent.infer({"X": digits.samples[:1]})
    assert (response.model_version, v1["digest"]) == ("1", v1["digest"])
