"""Per-device limits in the controller, on a real mosquitto and real SQLite, with a
device client holding the device's own credentials: which artifacts it may fetch,
how fast, how much it may store, what it can put into the log and /metrics, and
what its retained junk does at a controller reconnect."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from edgefleet_proto import artifact_pb2, fleet_pb2
from edgefleet_proto.codec import decode_as, encode
from edgefleet_proto.topics import Kind, Topic
from paho.mqtt.client import MQTTMessage
from prometheus_client.parser import text_string_to_metric_families

from controller import settings as settings_mod
from controller.log_bounds import MAX_LINE_CHARS
from controller.store import Store
from tests.support.broker import Broker
from tests.support.controller_process import Ctl, init_controller, messages_on, running
from tests.support.models import dense_of_size
from tests.support.mqtt_peer import Peer
from tests.support.waiting import wait_until

KIB = 1024


@contextmanager
def controller(broker: Broker, data_dir: Path, **limits: Any) -> Iterator[Ctl]:
    """A controller whose settings file carries ``limits``."""
    if not settings_mod.is_initialised(data_dir):
        settings, token = init_controller(broker, data_dir)
        settings_mod.save(settings.with_changes(**limits))
        (data_dir / "token").write_text(token)
    settings = settings_mod.load(data_dir)
    with running(broker, settings, (data_dir / "token").read_text()) as ctl:
        yield ctl


def metric_samples(ctl: Ctl) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = ctl.api("GET", "/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(ctl: Ctl, name: str, **labels: str) -> float:
    return metric_samples(ctl).get((name, tuple(sorted(labels.items()))), 0.0)


def assign(ctl: Ctl, model: str, version: str, device_id: str) -> str:
    """Roll ``model`` ``version`` out to ``device_id``; the digest its desired state names."""
    body = {"model": model, "version": version, "devices": [device_id]}
    response = ctl.api("POST", "/v1/rollouts", json=body)
    assert response.status_code == 201, response.text
    desired = dict(ctl.controller.fleet.desired_states())[device_id]
    digests = [m.artifact_digest for m in decode_as(fleet_pb2.DesiredState, desired).models]
    return digests[-1]


def report_active(peer: Peer, device_id: str, digest: str, at_ms: int) -> None:
    msg = fleet_pb2.ReportedState(device_id=device_id, desired_generation=1, reported_at_ms=at_ms)
    msg.models.add(
        tenant="default", model_name="dense", model_version="1", artifact_digest=digest, phase=4
    )  # fmt: skip
    peer.publish(str(Topic(device_id, Kind.REPORTED)), encode(msg), retain=True)


def responses(peer: Peer, device_id: str) -> list[artifact_pb2.ArtifactResponse]:
    topic = str(Topic(device_id, Kind.ARTIFACT_RESPONSE))
    return [decode_as(artifact_pb2.ArtifactResponse, bytes(m.payload)) for m in messages_on(peer, topic)]


def answers(peer: Peer, device_id: str, since: int, count: int) -> list[artifact_pb2.ArtifactResponse] | None:
    """The ``count`` responses after the first ``since``, once they are all in."""
    got = responses(peer, device_id)[since:]
    return got if len(got) >= count else None


def bodies(peer: Peer, device_id: str) -> list[str]:
    return [r.WhichOneof("body") or "" for r in responses(peer, device_id)]


def ask(peer: Peer, device_id: str, digest: str, indices: list[int], manifest: bool = False) -> None:
    request = artifact_pb2.ChunkRequest(digest=digest, want_manifest=manifest, indices=indices)
    peer.publish(str(Topic(device_id, Kind.ARTIFACT_REQUEST)), encode(request))


def test_a_device_fetches_only_artifacts_assigned_to_it_now_or_before(broker: Broker, tmp_path: Path) -> None:
    first = dense_of_size(tmp_path / "v1.onnx", 0.2, seed=1)
    second = dense_of_size(tmp_path / "v2.onnx", 0.2, seed=2)
    with controller(broker, tmp_path / "controller") as ctl:
        ctl.upload(first, "dense", "1")
        ctl.upload(second, "dense", "2")
        a = ctl.device_peer(ctl.register("cam-a"))
        b = ctl.device_peer(ctl.register("cam-b"))
        try:
            for device_id, peer in (("cam-a", a), ("cam-b", b)):
                peer.subscribe(str(Topic(device_id, Kind.ARTIFACT_RESPONSE)))
            old = assign(ctl, "dense", "1", "cam-a")
            # The device that was assigned it is served; the other one, asking for the same digest, is not.
            ask(a, "cam-a", old, [0], manifest=True)
            ask(b, "cam-b", old, [0], manifest=True)
            assert wait_until(
                lambda: len(bodies(a, "cam-a")) >= 2 and bodies(a, "cam-a"), 10, "cam-a served"
            ) == [
                "manifest",
                "chunk",
            ]
            (refusal,) = wait_until(lambda: responses(b, "cam-b"), 10, "cam-b answered")
            assert refusal.WhichOneof("body") == "error"
            assert refusal.error.reason == f"artifact {old} is not assigned to device cam-b"
            # A digest that exists nowhere gets the same answer: nothing tells what is stored.
            ask(b, "cam-b", "f" * 64, [0])
            again = wait_until(lambda: responses(b, "cam-b")[1:], 10, "the second refusal")
            assert again[0].error.reason == f"artifact {'f' * 64} is not assigned to device cam-b"

            # Moved on to version 2, cam-a may still fetch version 1 (what a rollback restores).
            report_active(a, "cam-a", old, 10)
            wait_until(
                lambda: all(r["status"] == "succeeded" for r in ctl.api("GET", "/v1/rollouts").json()),
                10,
                "the first rollout to finish",
            )
            new = assign(ctl, "dense", "2", "cam-a")
            assert new != old
            before = len(responses(a, "cam-a"))
            ask(a, "cam-a", old, [1])
            ask(a, "cam-a", new, [1])
            got = wait_until(partial(answers, a, "cam-a", before, 2), 10, "both chunks")
            assert [(r.WhichOneof("body"), r.chunk.digest) for r in got] == [("chunk", old), ("chunk", new)]
            assert len(responses(b, "cam-b")) == 2
            refused = partial(
                metric,
                ctl,
                "edgefleet_rejected_messages_total",
                kind="artifact/request",
                reason="not_assigned",
            )
            wait_until(lambda: refused() == 2 or None, 10, "both refusals counted")
        finally:
            a.close()
            b.close()


def test_chunk_requests_cannot_amplify_past_the_devices_byte_rate(broker: Broker, tmp_path: Path) -> None:
    rate, burst = 256 * KIB, 256 * KIB
    model = dense_of_size(tmp_path / "m.onnx", 0.6)
    limits = {"chunk_bytes_per_s": rate, "chunk_bytes_burst": burst, "chunk_requests_per_s": 5.0}
    with controller(broker, tmp_path / "controller", chunk_requests_burst=10, **limits) as ctl:
        ctl.upload(model, "dense", "1")
        peer = ctl.device_peer(ctl.register("cam-1"))
        received: list[tuple[float, int, int]] = []
        lock = threading.Lock()

        def on_message(message: MQTTMessage) -> None:
            response = decode_as(artifact_pb2.ArtifactResponse, bytes(message.payload))
            if response.WhichOneof("body") == "chunk":
                with lock:
                    received.append((time.monotonic(), response.chunk.index, len(response.chunk.data)))

        peer.on_message = on_message
        try:
            peer.subscribe(str(Topic("cam-1", Kind.ARTIFACT_RESPONSE)))
            digest = assign(ctl, "dense", "1", "cam-1")
            count = -(-model.stat().st_size // ctl.settings.chunk_size)
            # The observed attack: 40 requests of about 130 bytes, 64 chunk indices each.
            request = artifact_pb2.ChunkRequest(digest=digest, indices=[i % count for i in range(64)])
            assert len(encode(request)) < 200
            start = time.monotonic()
            for _ in range(40):
                peer.publish(str(Topic("cam-1", Kind.ARTIFACT_REQUEST)), encode(request))
            window_s = 4.0
            wait_until(lambda: list(received), 10, "the first chunks")
            time.sleep(max(0.0, window_s - (time.monotonic() - start)))
            with lock:
                got = [r for r in received if r[0] - start <= window_s]
            served = sum(size for _, _, size in got)
            # Whatever it asks, a device gets at most burst + rate * t bytes in t seconds.
            assert 0 < served <= burst + rate * window_s, served
            assert served < 40 * 64 * ctl.settings.chunk_size / 100
            for t, _, _ in got:
                upto = sum(size for when, _, size in got if when <= t)
                assert upto <= burst + rate * (t - start) + 1, (upto, t - start)
            limited = partial(metric, ctl, "edgefleet_device_rate_limited_total", device="cam-1")
            # 40 requests at once: at most the burst (10) and 5 a second get through.
            wait_until(
                lambda: limited(limit="chunk_requests") >= 40 - 10 - 5 * window_s - 1 or None,
                10,
                "requests over the rate counted",
            )
            wait_until(lambda: limited(limit="chunk_bytes"), 10, "chunks over the byte rate counted")
            served_total = partial(metric, ctl, "edgefleet_artifact_bytes_served_total", device="cam-1")
            wait_until(lambda: served_total() >= served or None, 10, "the bytes served counted")

            # A device that keeps to its budget is served everything it still misses.
            def missing() -> list[int]:
                with lock:
                    have = {index for _, index, _ in received}
                return [i for i in range(count) if i not in have]

            deadline = time.monotonic() + 30
            while missing() and time.monotonic() < deadline:
                ask(peer, "cam-1", digest, missing()[:4])
                time.sleep(1.0)  # an agent's request timeout, shortened
            assert not missing()
        finally:
            peer.close()


def test_an_event_flood_is_bounded_in_the_database_and_the_log(
    broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    quota, flood = 30, 150
    limits = {"events_per_s": 20.0, "events_burst": 40, "events_quota": quota}
    with controller(broker, tmp_path / "controller", **limits) as ctl:
        peer = ctl.device_peer(ctl.register("cam-1"))
        try:
            start = time.monotonic()
            for i in range(flood):
                event = fleet_pb2.Event(
                    device_id="cam-1", at_ms=i, kind="k" * 5000, severity="error", message="x" * 100_000
                )
                for a in range(20):
                    event.attributes[f"attr-{a}-" + "n" * 500] = "v\n" * 1000
                peer.publish(str(Topic("cam-1", Kind.EVENTS)), encode(event))
            for _ in range(100):
                peer.publish(str(Topic("cam-1", Kind.TELEMETRY)), b"\xff" * 50_000)

            def accounted() -> float:
                samples = metric_samples(ctl)
                limited = samples.get(
                    ("edgefleet_device_rate_limited_total", (("device", "cam-1"), ("limit", "events"))), 0.0
                )
                dropped = samples.get(
                    (
                        "edgefleet_device_quota_total",
                        (("action", "dropped_oldest"), ("device", "cam-1"), ("store", "events")),
                    ),
                    0.0,
                )
                return limited + dropped + len(ctl.api("GET", "/v1/devices/cam-1/events?limit=1000").json())

            wait_until(
                lambda: accounted() == flood or None, 30, f"all {flood} events stored, dropped or limited"
            )
            undecodable = partial(
                metric, ctl, "edgefleet_rejected_messages_total", kind="telemetry", reason="undecodable"
            )
            wait_until(lambda: undecodable() == 100 or None, 10, "the 100 bad telemetry payloads counted")
            elapsed = time.monotonic() - start
        finally:
            peer.close()
    store = Store(ctl.settings.db_path)
    try:
        row = store.query_one(
            "SELECT count(*) AS n, max(length(kind)) AS kind, max(length(message)) AS message,"
            " max(length(attributes)) AS attributes FROM events WHERE device_id = 'cam-1'"
        )
    finally:
        store.close()
    assert row is not None and 0 < row["n"] <= quota
    assert (row["kind"], row["message"]) == (64, 1024) and row["attributes"] <= 2048
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("controller")]
    assert max(len(line) for line in lines) <= MAX_LINE_CHARS + 100
    event_lines = [line for line in lines if line.startswith("device event device=cam-1")]
    assert 0 < len(event_lines) <= 40 + 20 * elapsed + 1
    # About the events over the rate, and about the 100 bad payloads: of each, 10 at once, then
    # one a second (bad_message_logs_per_s), the lines held back counted in the next one.
    for bad in ("payload rejected device=cam-1", "message over the device's rate limit dropped device=cam-1"):
        bad_lines = [line for line in lines if line.startswith(bad)]
        assert 0 < len(bad_lines) <= 10 + elapsed + 1, bad


def telemetry(seq: int, *models: tuple[str, str, str]) -> fleet_pb2.Telemetry:
    now_ms = int(time.time() * 1000)
    msg = fleet_pb2.Telemetry(
        device_id="cam-1", seq=seq, window_start_ms=now_ms - 10_000, window_end_ms=now_ms
    )
    for tenant, name, version in models:
        msg.models.add(
            tenant=tenant, model_name=name, model_version=version, inference_count=10, latency_p50_ms=1.0
        )  # fmt: skip
        msg.tenants.add(tenant=tenant, samples=10, inferences=10, dropped=1, errors=1)
    return msg


def test_metric_labels_carry_only_registered_names(broker: Broker, tmp_path: Path) -> None:
    with controller(broker, tmp_path / "controller") as ctl:
        ctl.upload(dense_of_size(tmp_path / "m.onnx", 0.1), "dense", "1")
        peer = ctl.device_peer(ctl.register("cam-1"))
        try:
            window = telemetry(
                1,
                ("default", "dense", "1"),
                ("default", "dense", "evil-version"),
                ("evil-tenant", "evil-model", "1"),
                ("evil-tenant.shadow", "evil-model-2", "9"),
            )
            peer.publish(str(Topic("cam-1", Kind.TELEMETRY)), encode(window))
            wait_until(lambda: ctl.api("GET", "/v1/devices/cam-1/telemetry").json(), 10, "the window stored")
        finally:
            peer.close()
        text = ctl.api("GET", "/metrics").text
        assert "evil" not in text
        samples = metric_samples(ctl)
        rate = "edgefleet_model_inference_rate"
        assert samples[(rate, (("model", "dense"), ("version", "1")))] == pytest.approx(10 / 300)
        assert samples[(rate, (("model", "dense"), ("version", "unregistered")))] == pytest.approx(10 / 300)
        assert samples[(rate, (("model", "unregistered"), ("version", "unregistered")))] == pytest.approx(
            20 / 300
        )
        dropped = "edgefleet_tenant_dropped_total"
        assert samples[(dropped, (("device", "cam-1"), ("tenant", "default")))] == 2
        assert samples[(dropped, (("device", "cam-1"), ("tenant", "unregistered")))] == 2


def junk(device_id: str) -> list[tuple[str, bytes]]:
    event = fleet_pb2.Event(
        device_id=device_id, at_ms=1, kind="junk", severity="error", message="retained junk"
    )
    window = fleet_pb2.Telemetry(device_id=device_id, seq=1, window_start_ms=1, window_end_ms=2)
    request = artifact_pb2.ChunkRequest(digest="a" * 64, want_manifest=True)
    return [
        (str(Topic(device_id, Kind.EVENTS)), encode(event)),
        (str(Topic(device_id, Kind.TELEMETRY)), encode(window)),
        (str(Topic(device_id, Kind.ARTIFACT_REQUEST)), encode(request)),
    ]


def stored_events(ctl: Ctl) -> list[str]:
    return [e["kind"] for e in ctl.api("GET", "/v1/devices/cam-1/events").json()]


def marker(ctl: Ctl, peer: Peer, name: str) -> list[str]:
    """Publish a live event and wait until it is stored: whatever arrived before it was handled."""
    peer.publish(
        str(Topic("cam-1", Kind.EVENTS)), encode(fleet_pb2.Event(device_id="cam-1", at_ms=2, kind=name))
    )

    def stored() -> list[str] | None:
        kinds = stored_events(ctl)
        return kinds if name in kinds else None

    return wait_until(stored, 10, f"event {name}")


def test_retained_junk_on_ingest_topics_is_refused_and_not_replayed_at_reconnect(
    broker: Broker, tmp_path: Path
) -> None:
    data_dir = tmp_path / "controller"
    with controller(broker, data_dir) as ctl:
        creds = ctl.register("cam-1")
        peer = ctl.device_peer(creds)
        try:
            for topic, payload in junk("cam-1"):
                peer.publish(topic, payload, retain=True)
            for kind in ("events", "telemetry", "artifact/request"):
                wait_until(
                    partial(metric, ctl, "edgefleet_rejected_messages_total", kind=kind, reason="retained"),
                    10,
                    f"the retained {kind} message refused",
                )
            assert marker(ctl, peer, "live-1") == ["live-1"]
        finally:
            peer.close()
    # Published while the controller is away: waits in its persistent session, retained.
    peer = ctl.device_peer(creds)
    try:
        for topic, payload in junk("cam-1"):
            peer.publish(topic, payload, retain=True)
    finally:
        peer.close()
    refused: list[int] = []
    for run in (2, 3):
        with controller(broker, data_dir) as ctl:
            peer = ctl.device_peer(creds)
            try:
                marker(ctl, peer, f"live-{run}-a")
                live = {"live-1", *(f"live-{r}-{x}" for r in range(2, run + 1) for x in "ab")}
                assert set(marker(ctl, peer, f"live-{run}-b")) == live
            finally:
                peer.close()
            assert ctl.api("GET", "/v1/devices/cam-1/telemetry").json() == []
        refused.append(refusals(ctl.settings.db_path))
    # Refused while it ran and when it came back; cleared on the broker, so never seen again.
    assert refused[0] >= 2 and refused[1] == refused[0], refused


def refusals(db: Path) -> int:
    store = Store(db)
    try:
        row = store.query_one(
            "SELECT value FROM message_counters WHERE counter = 'rejected' AND kind = 'events' AND reason = 'retained'"
        )
    finally:
        store.close()
    return int(row["value"]) if row else 0


def test_stored_telemetry_and_captured_data_stay_within_the_devices_quotas(
    broker: Broker, tmp_path: Path
) -> None:
    limits = {"telemetry_quota_bytes": 100_000, "capture_quota_bytes": 50_000}
    with controller(broker, tmp_path / "controller", **limits) as ctl:
        peer = ctl.device_peer(ctl.register("cam-1"))
        try:
            for seq in range(1, 61):
                models = [("default", f"model-{n:03d}", "1") for n in range(20)]
                peer.publish(str(Topic("cam-1", Kind.TELEMETRY)), encode(telemetry(seq, *models)))
            for n in range(20):
                chunk = fleet_pb2.CaptureChunk(
                    upload_id=f"up-{n}", index=0, count=2, data=b"x" * 5000, sha256="0" * 64, size=10_000
                )
                peer.publish(str(Topic("cam-1", Kind.CAPTURE)), encode(chunk))
            quota = partial(metric, ctl, "edgefleet_device_quota_total", device="cam-1")
            wait_until(
                lambda: quota(store="capture", action="refused") >= 10 or None, 20, "capture chunks refused"
            )
            wait_until(
                lambda: (
                    60 in [t["seq"] for t in ctl.api("GET", "/v1/devices/cam-1/telemetry").json()] or None
                ),
                20,
                "the newest window stored",
            )
            stored = [t["seq"] for t in ctl.api("GET", "/v1/devices/cam-1/telemetry?limit=1000").json()]
            # The oldest went first, each counted.
            assert stored == list(range(60, 60 - len(stored), -1)) and len(stored) < 60
            wait_until(
                lambda: quota(store="telemetry", action="dropped_oldest") == 60 - len(stored) or None,
                10,
                "the dropped windows counted",
            )
        finally:
            peer.close()
    db = Store(ctl.settings.db_path)
    try:
        row = db.query_one(
            "SELECT sum(length(system) + length(models) + length(shadows) + length(tenants)) AS n FROM telemetry"
        )
    finally:
        db.close()
    assert row is not None and row["n"] <= 100_000
    staged = sum(f.stat().st_size for f in (ctl.settings.data_dir / "datasets" / "staging").rglob("*.part"))
    assert 0 < staged <= 50_000
