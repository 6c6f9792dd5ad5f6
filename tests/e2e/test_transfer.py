"""Chunked transfer: resume after kill -9, corrupt chunks, broker memory."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import psutil
from edgefleet_proto import artifact_pb2
from edgefleet_proto.codec import decode_as, encode

from tests.broker import Broker
from tests.localfleet import Agent, Controller, register_agent, rollout_done, wait_until
from tests.models import dense_of_size, digits_classifier
from tests.mqtt_peer import Peer


class RequestLog:
    """Every chunk index a device asks the controller for, seen from the broker."""

    def __init__(self, controller: Controller, broker: Broker, device_id: str) -> None:
        self.indices: list[int] = []
        self._lock = threading.Lock()
        self.peer = Peer(
            broker.port, "edgefleet-controller", controller.mqtt_password(), client_id="test-observer"
        )
        self.peer.on_message = self._record
        self.peer.subscribe(f"edgefleet/v1/devices/{device_id}/artifact/request")

    def _record(self, message: Any) -> None:
        request = decode_as(artifact_pb2.ChunkRequest, message.payload)
        with self._lock:
            self.indices.extend(request.indices)

    def take(self) -> list[int]:
        with self._lock:
            taken, self.indices = self.indices, []
            return taken


def bytes_have(controller: Controller, device_id: str, digest: str) -> int:
    reported = controller.api("GET", f"/v1/devices/{device_id}").json().get("reported") or {}
    for m in reported.get("models", []):
        if m["artifact_digest"] == digest:
            return int(m["bytes_have"]) if m["phase"] != "active" else int(m["bytes_total"])
    return 0


def upload(controller: Controller, path: Path, name: str, version: str) -> dict[str, Any]:
    body: dict[str, Any] = controller.cli("models", "upload", str(path), "--name", name, "--version", version)
    return body


def test_kill_mid_download_resumes_from_chunks_on_disk(
    broker: Broker, controller: Controller, agents: list[Agent], tmp_path: Path
) -> None:
    big = upload(controller, dense_of_size(tmp_path / "big.onnx", 20), "big", "1")
    chunks = -(-big["size"] // 65536)
    agent = register_agent(controller, tmp_path / "agents", "dev-r")
    agents.append(agent.start())
    wait_until(lambda: controller.cli("devices", "list")[0]["online"], 30, "agent online")
    requests = RequestLog(controller, broker, "dev-r")
    broker_proc = psutil.Process(broker.proc.pid if broker.proc else 0)
    rss_before = broker_proc.memory_info().rss
    rss_peak = [rss_before]
    rollout = controller.cli("rollouts", "create", "--model", "big", "--version", "1", "--device", "dev-r")

    def partway() -> bool:
        rss_peak.append(broker_proc.memory_info().rss)
        return big["size"] // 4 <= bytes_have(controller, "dev-r", big["digest"]) < big["size"] // 2

    wait_until(partway, 60, "a quarter of the download", interval=0.02)
    agent.kill()
    before_kill = set(requests.take())
    part_files = list(agent.data_dir.rglob("*.part"))
    assert part_files, "the agent keeps its partial download on disk"

    agent.start()
    final = wait_until(lambda: rollout_done(controller, rollout["id"]), 120, "the rollout to finish")
    assert final["status"] == "succeeded", final
    after_restart = requests.take()
    requests.peer.close()
    # It asked again only for what it did not have: at most the window lost in flight.
    assert len(after_restart) < chunks - len(before_kill) + 16, (len(after_restart), len(before_kill), chunks)
    assert before_kill | set(after_restart) == set(range(chunks))
    # The broker never held the 20 MB model: chunks flow through a small window.
    assert max(rss_peak) - rss_before < 12 * 1024 * 1024


def test_corrupt_chunks_are_rejected_and_fetched_again(
    broker: Broker, controller: Controller, agents: list[Agent], tmp_path: Path
) -> None:
    big = upload(controller, dense_of_size(tmp_path / "big.onnx", 8), "big", "1")
    agent = register_agent(controller, tmp_path / "agents", "dev-c")
    agents.append(agent.start())
    wait_until(lambda: controller.cli("devices", "list")[0]["online"], 30, "agent online")
    forger = Peer(broker.port, "edgefleet-controller", controller.mqtt_password(), client_id="test-forger")
    rollout = controller.cli("rollouts", "create", "--model", "big", "--version", "1", "--device", "dev-c")
    wait_until(
        lambda: bytes_have(controller, "dev-c", big["digest"]) > 0, 60, "download under way", interval=0.02
    )

    # In flight: a chunk whose bytes do not match the manifest.
    forged = artifact_pb2.ArtifactResponse(
        chunk=artifact_pb2.Chunk(digest=big["digest"], index=5, offset=5 * 65536, data=b"\x00" * 65536)
    )
    assert not forger.publish("edgefleet/v1/devices/dev-c/artifact/response", encode(forged)).is_failure
    forger.close()

    # On disk: kill the agent and flip bytes inside what it already downloaded.
    agent.kill()
    part = next(agent.data_dir.rglob("*.part"))
    with part.open("r+b") as f:
        f.seek(100)
        f.write(b"\xde\xad\xbe\xef" * 16)
    agent.start()

    final = wait_until(lambda: rollout_done(controller, rollout["id"]), 120, "the rollout to finish")
    assert final["status"] == "succeeded", final
    installed = list((agent.data_dir / "models").glob(f"{big['digest']}*"))
    assert installed, "the verified model is installed under its digest"
    events = controller.cli("events", "dev-c", "--limit", "200")
    assert "chunk_rejected" in {e["kind"] for e in events}


def test_model_that_does_not_match_its_digest_is_refused_and_previous_kept(
    broker: Broker, controller: Controller, agents: list[Agent], tmp_path: Path
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
