"""Chunk serving under load on a real mosquitto and real SQLite: several devices
fetching at once each get every chunk, stay online and seen, and what was seen is
in the database once the controller stops; a device is served from the moment it
is registered."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import time
from functools import partial
from pathlib import Path
from typing import Any

from edgefleet_proto import artifact_pb2, fleet_pb2
from edgefleet_proto.codec import decode_as, encode
from edgefleet_proto.topics import Kind, Topic

from controller.store import Store
from tests.support.broker import Broker, wait_for_port
from tests.support.controller_process import init_controller, messages_on, running
from tests.support.models import dense_of_size
from tests.support.mqtt_peer import Peer
from tests.support.waiting import wait_until

DEVICES = 6


def responses(peer: Peer, device_id: str) -> list[artifact_pb2.ArtifactResponse]:
    topic = str(Topic(device_id, Kind.ARTIFACT_RESPONSE))
    return [decode_as(artifact_pb2.ArtifactResponse, bytes(m.payload)) for m in messages_on(peer, topic)]


def every_chunk(peer: Peer, device_id: str, count: int) -> dict[int, bytes] | None:
    got = {r.chunk.index: r.chunk.data for r in responses(peer, device_id) if r.WhichOneof("body") == "chunk"}
    return got if len(got) == count else None


def test_devices_fetching_at_once_get_every_chunk_and_stay_online_and_seen(
    broker: Broker, tmp_path: Path
) -> None:
    settings, token = init_controller(broker, tmp_path / "controller")
    model = dense_of_size(tmp_path / "dense.onnx", 0.6).read_bytes()
    (tmp_path / "m.onnx").write_bytes(model)
    peers: dict[str, Peer] = {}
    with running(broker, settings, token) as ctl:
        digest = ctl.upload(tmp_path / "m.onnx", "dense", "1").json()["digest"]
        count = -(-len(model) // settings.chunk_size)
        try:
            for i in range(DEVICES):
                device_id = f"cam-{i}"
                peer = peers[device_id] = ctl.device_peer(ctl.register(device_id))
                peer.subscribe(str(Topic(device_id, Kind.ARTIFACT_RESPONSE)))
                status = fleet_pb2.DeviceStatus(online=True, at_ms=int(time.time() * 1000), agent_version="t")
                peer.publish(str(Topic(device_id, Kind.STATUS)), encode(status), retain=True)
            # A device is served only what it was assigned.
            body = {"model": "dense", "version": "1", "devices": list(peers)}
            assert ctl.api("POST", "/v1/rollouts", json=body).status_code == 201
            # Every device asks for every chunk, interleaved, one window of 8 at a time.
            for start in range(0, count, 8):
                for device_id, peer in peers.items():
                    window = list(range(start, min(count, start + 8)))
                    request = artifact_pb2.ChunkRequest(digest=digest, indices=window)
                    peer.publish(str(Topic(device_id, Kind.ARTIFACT_REQUEST)), encode(request))
            last_request_at = time.time()
            for device_id, peer in peers.items():
                got = wait_until(
                    partial(every_chunk, peer, device_id, count), 20, f"every chunk for {device_id}"
                )
                whole = b"".join(got[i] for i in range(count))
                assert hashlib.sha256(whole).hexdigest() == digest
            devices: list[dict[str, Any]] = ctl.api("GET", "/v1/devices").json()
            assert len(devices) == DEVICES
            for device in devices:
                assert device["online"], device
                # Held back for at most a second, but shown at once.
                assert device["last_seen"] > last_request_at - 1.0, (device, last_request_at)
        finally:
            for peer in peers.values():
                peer.close()
        shown = {d["device_id"]: d["last_seen"] for d in ctl.api("GET", "/v1/devices").json()}
    store = Store(settings.db_path)
    try:
        rows = store.query("SELECT device_id, last_seen FROM devices")
    finally:
        store.close()
    assert {r["device_id"]: r["last_seen"] for r in rows} == shown, "nothing held back is lost at stop"


def test_a_device_is_served_from_the_moment_it_is_registered(
    broker: Broker, tmp_path: Path, caplog: Any
) -> None:
    settings, token = init_controller(broker, tmp_path / "controller")
    (tmp_path / "m.onnx").write_bytes(dense_of_size(tmp_path / "dense.onnx", 0.1).read_bytes())
    with running(broker, settings, token) as ctl:
        digest = ctl.upload(tmp_path / "m.onnx", "dense", "1").json()["digest"]
        as_controller = ctl.controller_peer()
        try:
            as_controller.subscribe(str(Topic("late", Kind.ARTIFACT_RESPONSE)))
            ask = encode(artifact_pb2.ChunkRequest(digest=digest, want_manifest=True))
            # Not registered yet: ignored (the controller's user may publish for anyone).
            as_controller.publish(str(Topic("late", Kind.ARTIFACT_REQUEST)), ask)
            wait_until(lambda: "unknown device ignored device=late" in caplog.text, 10, "the request ignored")
        finally:
            # Registering rewrites the broker's password file, which logs the test tool out.
            as_controller.close()
        late = ctl.device_peer(ctl.register("late"))
        try:
            body = {"model": "dense", "version": "1", "devices": ["late"]}
            assert ctl.api("POST", "/v1/rollouts", json=body).status_code == 201
            late.subscribe(str(Topic("late", Kind.ARTIFACT_RESPONSE)))
            late.publish(str(Topic("late", Kind.ARTIFACT_REQUEST)), ask)
            got = wait_until(lambda: responses(late, "late"), 10, "the manifest for the registered device")
            assert [r.WhichOneof("body") for r in got] == ["manifest"]
        finally:
            late.close()


class SmallWindowBroker(Broker):
    """The deploy config, but announcing a Receive Maximum of 4 (mosquitto reads it only at start)."""

    def start(self) -> Broker:
        super().start()
        self.stop()
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(conf.read_text().replace("max_inflight_messages 100", "max_inflight_messages 4"))
        with (self.workdir / "stderr.log").open("ab") as err:
            binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
            self.proc = subprocess.Popen([binary, "-c", str(conf)], stderr=err)
        wait_for_port(self.port)
        return self


def test_replies_in_flight_stay_within_the_brokers_receive_maximum(tmp_path: Path, caplog: Any) -> None:
    broker = SmallWindowBroker(tmp_path / "broker").start()
    try:
        settings, token = init_controller(broker, tmp_path / "controller")
        (tmp_path / "m.onnx").write_bytes(dense_of_size(tmp_path / "dense.onnx", 0.6).read_bytes())
        with running(broker, settings, token) as ctl:
            transport = ctl.controller.transport
            assert transport is not None
            wait_until(lambda: transport._client.max_inflight_messages == 4, 10, "the broker's limit")
            assert transport.wait_connected(15)
            digest = ctl.upload(tmp_path / "m.onnx", "dense", "1").json()["digest"]
            count = -(-ctl.controller.artifacts.manifest(digest).size // settings.chunk_size)
            peer = ctl.device_peer(ctl.register("cam-1"))
            body = {"model": "dense", "version": "1", "devices": ["cam-1"]}
            assert ctl.api("POST", "/v1/rollouts", json=body).status_code == 201
            try:
                peer.subscribe(str(Topic("cam-1", Kind.ARTIFACT_RESPONSE)))
                request = artifact_pb2.ChunkRequest(digest=digest, indices=list(range(count)))
                peer.publish(str(Topic("cam-1", Kind.ARTIFACT_REQUEST)), encode(request))
                wait_until(partial(every_chunk, peer, "cam-1", count), 20, "every chunk, 4 in flight at most")
            finally:
                peer.close()
    finally:
        broker.stop()
    assert "receive_maximum=4 in_flight=100" in caplog.text
