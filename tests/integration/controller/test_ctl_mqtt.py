"""The controller's MQTT side against a real mosquitto, with device peers using
the credentials the API hands out."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from edgefleet_proto import artifact_pb2, fleet_pb2
from edgefleet_proto.codec import decode_as, encode
from edgefleet_proto.topics import Kind, Topic

from controller.transport import Transport
from tests.support.broker import Broker
from tests.support.controller_calls import desired_seen, rollout
from tests.support.controller_process import Ctl, connect, init_controller, messages_on, running
from tests.support.models import dense_of_size
from tests.support.mqtt_peer import Peer
from tests.support.waiting import wait_until


def responses(peer: Peer, device_id: str) -> list[artifact_pb2.ArtifactResponse]:
    topic = str(Topic(device_id, Kind.ARTIFACT_RESPONSE))
    return [decode_as(artifact_pb2.ArtifactResponse, m.payload) for m in messages_on(peer, topic)]


def test_registered_device_connects_and_stays_in_its_own_subtree(ctl: Ctl) -> None:
    a = ctl.register("dev-a")
    ctl.register("dev-b")
    peer = ctl.device_peer(a)
    try:
        assert not peer.publish("edgefleet/v1/devices/dev-a/telemetry", b"").is_failure
        for topic in (
            "edgefleet/v1/devices/dev-b/telemetry",
            "edgefleet/v1/devices/dev-b/reported",
            "edgefleet/v1/devices/dev-a/desired",
            "edgefleet/v1/devices/dev-b/artifact/response",
        ):
            code = peer.publish(topic, b"x")
            assert code.is_failure and str(code) == "Not authorized", (topic, code)
    finally:
        peer.close()
    try:
        Peer(ctl.broker.port, "dev-a", "wrong password", client_id="dev-a-wrong")
    except ConnectionError as exc:
        assert "dev-a" in str(exc)
    else:
        raise AssertionError("a wrong password must be refused")


def test_rollout_publishes_a_retained_desired_state(ctl: Ctl, digits_model: Path) -> None:
    version = ctl.upload(digits_model, "digits", "1").json()
    creds = ctl.register("cam-1")
    created = rollout(ctl, "digits", "1", "cam-1")
    # Subscribing afterwards: what arrives is the broker's retained copy.
    peer = ctl.device_peer(creds)
    try:
        peer.subscribe(str(Topic("cam-1", Kind.DESIRED)))
        desired = wait_until(lambda: desired_seen(peer, "cam-1", 1), 10, "the desired state")
        assert messages_on(peer, str(Topic("cam-1", Kind.DESIRED)))[0].retain
        assert desired.device_id == "cam-1"
        [m] = desired.models
        assert (m.tenant, m.model_name, m.model_version, m.format, m.runtime) == (
            "default",
            "digits",
            "1",
            "onnx",
            "onnxruntime",
        )
        assert (m.artifact_digest, m.artifact_size, m.rollout_id) == (
            version["digest"],
            version["size"],
            created["id"],
        )
        # A second rollout bumps the generation, live.
        rollout(ctl, "digits", "1", "cam-1")
        rollout(ctl, "digits", "1", "cam-1")
        assert (
            wait_until(lambda: desired_seen(peer, "cam-1", 3), 10, "generation 3").models[0].artifact_digest
        )
    finally:
        peer.close()


def test_chunk_requests_are_answered_from_the_store(ctl: Ctl, tmp_path: Path) -> None:
    model = dense_of_size(tmp_path / "dense.onnx", 0.6)
    version = ctl.upload(model, "dense", "1").json()
    digest = version["digest"]
    peer = ctl.device_peer(ctl.register("cam-1"))
    rollout(ctl, "dense", "1", "cam-1")  # a device is served only what it was assigned
    request_topic = str(Topic("cam-1", Kind.ARTIFACT_REQUEST))
    try:
        peer.subscribe(str(Topic("cam-1", Kind.ARTIFACT_RESPONSE)))
        ask = artifact_pb2.ChunkRequest(digest=digest, want_manifest=True)
        assert not peer.publish(request_topic, encode(ask)).is_failure
        first = wait_until(lambda: responses(peer, "cam-1"), 10, "the manifest")[0]
        assert first.WhichOneof("body") == "manifest"
        manifest = first.manifest
        count = len(manifest.chunk_sha256)
        assert (manifest.digest, manifest.size, manifest.chunk_size) == (digest, version["size"], 65536)
        assert count == -(-version["size"] // 65536) and count > 1
        for start in range(0, count, 8):
            window = list(range(start, min(count, start + 8)))
            peer.publish(request_topic, encode(artifact_pb2.ChunkRequest(digest=digest, indices=window)))
        got = wait_until(
            lambda: (
                [r.chunk for r in responses(peer, "cam-1") if r.WhichOneof("body") == "chunk"] or None
                if len(responses(peer, "cam-1")) >= count + 1
                else None
            ),
            10,
            "every chunk",
        )
        by_index = {c.index: c for c in got}
        assert sorted(by_index) == list(range(count))
        for index, chunk in by_index.items():
            assert chunk.digest == digest and chunk.offset == index * 65536
            assert hashlib.sha256(chunk.data).digest() == manifest.chunk_sha256[index]
        whole = b"".join(by_index[i].data for i in range(count))
        assert hashlib.sha256(whole).hexdigest() == digest and whole == model.read_bytes()

        before = len(responses(peer, "cam-1"))
        peer.publish(request_topic, encode(artifact_pb2.ChunkRequest(digest=digest, indices=[count])))
        peer.publish(request_topic, encode(artifact_pb2.ChunkRequest(digest="f" * 64, want_manifest=True)))
        errors = wait_until(
            lambda: (
                [r.error for r in responses(peer, "cam-1")[before:] if r.WhichOneof("body") == "error"][:2]
                if len(responses(peer, "cam-1")) >= before + 2
                else None
            ),
            10,
            "two errors",
        )
        assert errors[0].digest == digest and f"no chunk {count}" in errors[0].reason
        assert errors[1].digest == "f" * 64 and "is not assigned to device cam-1" in errors[1].reason
    finally:
        peer.close()


def reported_state(device_id: str, digest: str, phase: int, at_ms: int, error: str = "") -> bytes:
    msg = fleet_pb2.ReportedState(
        device_id=device_id, desired_generation=1, reported_at_ms=at_ms, agent_version="t"
    )
    msg.models.add(
        tenant="default",
        model_name="digits",
        model_version="1",
        artifact_digest=digest,
        phase=phase,  # type: ignore[arg-type]
        bytes_have=10,
        bytes_total=100,
        error=error,
    )
    return encode(msg)


def test_device_messages_are_ingested_and_drive_rollout_status(ctl: Ctl, digits_model: Path) -> None:
    digest = ctl.upload(digits_model, "digits", "1").json()["digest"]
    peer = ctl.device_peer(ctl.register("cam-1"))
    created = rollout(ctl, "digits", "1", "cam-1")

    def rollout_device() -> dict[str, Any]:
        device: dict[str, Any] = ctl.api("GET", f"/v1/rollouts/{created['id']}").json()["devices"][0]
        return device

    try:
        status = fleet_pb2.DeviceStatus(online=True, at_ms=1, agent_version="0.1.0")
        assert not peer.publish(str(Topic("cam-1", Kind.STATUS)), encode(status), retain=True).is_failure
        wait_until(lambda: ctl.api("GET", "/v1/devices/cam-1").json()["online"], 10, "online")

        reported_topic = str(Topic("cam-1", Kind.REPORTED))
        peer.publish(
            reported_topic,
            reported_state("cam-1", digest, fleet_pb2.MODEL_PHASE_DOWNLOADING, 10),
            retain=True,
        )
        assert wait_until(lambda: rollout_device()["status"] == "downloading", 10, "downloading")
        assert rollout_device()["detail"] == "10/100 bytes"
        peer.publish(
            reported_topic, reported_state("cam-1", digest, fleet_pb2.MODEL_PHASE_ACTIVE, 20), retain=True
        )
        wait_until(
            lambda: ctl.api("GET", f"/v1/rollouts/{created['id']}").json()["status"] == "succeeded",
            10,
            "done",
        )
        device = ctl.api("GET", "/v1/devices/cam-1").json()
        assert device["reported"]["models"][0]["phase"] == "active"
        assert device["reported"]["desired_generation"] == 1 and device["agent_version"] == "0.1.0"
        assert device["last_seen"] is not None

        telemetry = fleet_pb2.Telemetry(device_id="cam-1", seq=7, window_start_ms=1000, window_end_ms=2000)
        telemetry.system.cpu_percent = 33.0
        telemetry.models.add(tenant="default", model_name="digits", model_version="1", inference_count=5)
        peer.publish(str(Topic("cam-1", Kind.TELEMETRY)), encode(telemetry))
        event = fleet_pb2.Event(
            device_id="cam-1", at_ms=1500, kind="model_activated", severity="info", message="ok"
        )
        event.attributes["version"] = "1"
        peer.publish(str(Topic("cam-1", Kind.EVENTS)), encode(event))
        rows = wait_until(lambda: ctl.api("GET", "/v1/devices/cam-1/telemetry").json(), 10, "telemetry")
        assert (rows[0]["seq"], rows[0]["window_end_ms"], rows[0]["outbox_dropped"]) == (7, 2000, 0)
        assert rows[0]["system"]["cpu_percent"] == 33.0 and rows[0]["system"]["temperature_c"] is None
        assert rows[0]["models"][0]["inference_count"] == 5
        events = wait_until(lambda: ctl.api("GET", "/v1/devices/cam-1/events").json(), 10, "events")
        assert events[0]["kind"] == "model_activated" and events[0]["attributes"] == {"version": "1"}

        peer.publish(
            reported_topic,
            reported_state("cam-1", digest, fleet_pb2.MODEL_PHASE_FAILED, 30, "bad"),
            retain=True,
        )
        failed = wait_until(lambda: rollout_device()["status"] == "failed" and rollout_device(), 10, "failed")
        assert failed["detail"] == "bad"
        assert ctl.api("GET", f"/v1/rollouts/{created['id']}").json()["status"] == "failed"
    finally:
        peer.close()


GARBAGE = [b"\xff\xff\xff\xff", b"\x0a\x7fshort", b"not protobuf at all", b"\x08" * 3, b""]


def test_malformed_payloads_are_ignored_and_the_controller_keeps_working(
    ctl: Ctl, digits_model: Path, caplog: Any
) -> None:
    digest = ctl.upload(digits_model, "digits", "1").json()["digest"]
    peer = ctl.device_peer(ctl.register("cam-1"))
    rollout(ctl, "digits", "1", "cam-1")
    as_controller = ctl.controller_peer()
    try:
        peer.subscribe(str(Topic("cam-1", Kind.ARTIFACT_RESPONSE)))
        for kind in (Kind.REPORTED, Kind.STATUS, Kind.TELEMETRY, Kind.EVENTS, Kind.ARTIFACT_REQUEST):
            for payload in GARBAGE:
                assert not peer.publish(str(Topic("cam-1", kind)), payload).is_failure
                assert not as_controller.publish(str(Topic("ghost", kind)), payload).is_failure
            # Well-formed, but from a device nobody registered, or naming another device.
            as_controller.publish(str(Topic("ghost", Kind.TELEMETRY)), encode(fleet_pb2.Telemetry(seq=1)))
        peer.publish(
            str(Topic("cam-1", Kind.TELEMETRY)), encode(fleet_pb2.Telemetry(device_id="cam-2", seq=9))
        )
        as_controller.publish("edgefleet/v1/devices/cam-1/unknown-kind", b"x")
        as_controller.publish("edgefleet/v1/devices/bad id/telemetry", b"x")

        # Still serving: a valid request is answered, valid telemetry is stored.
        peer.publish(
            str(Topic("cam-1", Kind.ARTIFACT_REQUEST)),
            encode(artifact_pb2.ChunkRequest(digest=digest, want_manifest=True)),
        )
        wait_until(
            lambda: [r for r in responses(peer, "cam-1") if r.WhichOneof("body") == "manifest"],
            10,
            "a manifest",
        )
        peer.publish(
            str(Topic("cam-1", Kind.TELEMETRY)), encode(fleet_pb2.Telemetry(device_id="cam-1", seq=3))
        )
        rows = wait_until(lambda: ctl.api("GET", "/v1/devices/cam-1/telemetry").json(), 10, "valid telemetry")
        assert [r["seq"] for r in rows] == [3]
        assert ctl.api("GET", "/v1/devices").json()[0]["reported"] is None
        assert ctl.api("GET", "/v1/devices/cam-1/events").json() == []
        transport = ctl.controller.transport
        assert transport is not None and transport.connected.is_set()
    finally:
        peer.close()
        as_controller.close()
    logged = caplog.text
    assert (
        "payload rejected device=cam-1 topic=edgefleet/v1/devices/cam-1/reported reason=malformed" in logged
    )
    assert "message from unknown device ignored device=ghost" in logged
    assert "payload names device 'cam-2'" in logged


def test_desired_states_are_republished_when_the_broker_lost_them(ctl: Ctl, digits_model: Path) -> None:
    ctl.upload(digits_model, "digits", "1")
    creds = ctl.register("cam-1")
    rollout(ctl, "digits", "1", "cam-1")
    as_controller = ctl.controller_peer()
    # Wipe the retained copy, as a broker that lost its store would have.
    assert not as_controller.publish(str(Topic("cam-1", Kind.DESIRED)), b"", retain=True).is_failure
    as_controller.close()
    transport = ctl.controller.transport
    assert transport is not None
    before = transport.disconnects
    ctl.broker.restart()
    wait_until(lambda: transport.disconnects > before or None, 10, "the controller to notice")
    assert transport.wait_connected(30)
    peer = ctl.device_peer(creds)
    try:
        peer.subscribe(str(Topic("cam-1", Kind.DESIRED)))
        assert wait_until(lambda: desired_seen(peer, "cam-1", 1), 10, "the republished desired state")
    finally:
        peer.close()


def test_mqtt_v311(broker: Broker, tmp_path: Path, digits_model: Path) -> None:
    settings, token = init_controller(broker, tmp_path / "v311", mqtt_protocol="v311")
    with running(broker, settings, token) as ctl:
        ctl.upload(digits_model, "digits", "1")
        creds = ctl.register("cam-1")
        assert creds["mqtt_protocol"] == "v311"
        rollout(ctl, "digits", "1", "cam-1")
        peer = connect(broker.port, "cam-1", creds["mqtt_password"], "cam-1-v311-test")
        try:
            peer.subscribe(str(Topic("cam-1", Kind.DESIRED)))
            assert wait_until(lambda: desired_seen(peer, "cam-1", 1), 10, "desired over v3.1.1")
            telemetry = fleet_pb2.Telemetry(device_id="cam-1", seq=1, window_end_ms=5)
            peer.publish(str(Topic("cam-1", Kind.TELEMETRY)), encode(telemetry))
            assert wait_until(lambda: ctl.api("GET", "/v1/devices/cam-1/telemetry").json(), 10, "telemetry")
        finally:
            peer.close()


def test_a_device_that_dies_goes_offline_through_its_last_will(ctl: Ctl) -> None:
    creds = ctl.register("cam-1")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="cam-1-will", protocol=mqtt.MQTTv5)
    client.username_pw_set("cam-1", creds["mqtt_password"])
    topic = str(Topic("cam-1", Kind.STATUS))
    # The will is fixed at connect time, so its timestamp is older than "online".
    client.will_set(topic, encode(fleet_pb2.DeviceStatus(online=False, at_ms=1)), qos=1, retain=True)
    connected = wait_until(lambda: client.connect("127.0.0.1", ctl.broker.port) == 0 or None, 10, "connect")
    assert connected
    client.loop_start()
    try:
        client.publish(topic, encode(fleet_pb2.DeviceStatus(online=True, at_ms=2)), qos=1, retain=True)
        wait_until(lambda: ctl.api("GET", "/v1/devices/cam-1").json()["online"], 10, "online")
        sock = client.socket()
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)  # like kill -9: no DISCONNECT, so the broker sends the will
        wait_until(lambda: not ctl.api("GET", "/v1/devices/cam-1").json()["online"], 10, "offline")
    finally:
        client.loop_stop()


def test_refused_publishes_are_logged_as_errors_naming_the_device(ctl: Ctl, caplog: Any) -> None:
    creds = ctl.register("cam-1")
    # A transport logged in with a device's credentials: the ACL refuses what only the controller may do.
    as_device = ctl.settings.with_changes(
        mqtt_username="cam-1", mqtt_password=creds["mqtt_password"], mqtt_client_id="cam-1-as-controller"
    )
    c = ctl.controller
    transport = Transport(as_device, c.fleet, c.telemetry, c.artifacts)
    transport.start()
    try:
        assert wait_until(lambda: transport.wait_connected(0.5) or None, 10, "connected as cam-1")
        transport.publish_desired("cam-1", encode(fleet_pb2.DesiredState(device_id="cam-1", generation=1)))
        refused = "broker refused publish device=cam-1 topic=edgefleet/v1/devices/cam-1/desired reason=Not authorized"
        wait_until(lambda: refused in caplog.text or None, 10, "the refusal to be logged")
        assert [r.levelname for r in caplog.records if refused in r.getMessage()] == ["ERROR"]
    finally:
        transport.stop()
