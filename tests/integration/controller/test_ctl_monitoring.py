"""Monitoring through a real controller and broker: batched ingest, roll-ups,
drift sketches scored against a reference baseline, /metrics, captured data sets."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from edgefleet_proto import fleet_pb2
from edgefleet_proto.codec import encode
from edgefleet_proto.topics import Kind, Topic
from google.protobuf.json_format import ParseDict

from agent.drift_sketch import build_sketch
from controller.auth import hash_token
from controller.baselines import sketch_from_proto as baselines_sketch
from tests.support.broker import Broker
from tests.support.controller_process import Ctl
from tests.support.localfleet import Controller as LocalController
from tests.support.models import digits_classifier
from tests.support.mqtt_peer import Peer
from tests.support.waiting import wait_until

BUCKET_MS = 60_000


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    d = digits_classifier(tmp_path_factory.mktemp("digits") / "digits.onnx")
    session = ort.InferenceSession(str(d.path), providers=["CPUExecutionProvider"])
    probs = session.run(["probabilities"], {session.get_inputs()[0].name: d.samples})[0]
    return d.path, d.samples, probs


def telemetry(device: str, seq: int, end_ms: int, **model: Any) -> fleet_pb2.Telemetry:
    msg = fleet_pb2.Telemetry(
        device_id=device, seq=seq, window_start_ms=end_ms - 10_000, window_end_ms=end_ms
    )
    msg.models.add(tenant="default", model_name="digits", model_version="1", **model)
    return msg


def device(ctl: Ctl, device_id: str) -> Peer:
    return ctl.device_peer(ctl.register(device_id))


def test_telemetry_is_batched_rolled_up_and_exported(ctl: Ctl) -> None:
    peer = device(ctl, "cam-1")
    try:
        n = 300
        for seq in range(n):
            end = BUCKET_MS * (1 + seq // 100) + 1 + seq % 100  # three buckets of 100 windows
            m = telemetry("cam-1", seq, end, inference_count=10, error_count=seq % 2, latency_p50_ms=2.0)
            m.models[0].latency_p99_ms = float(seq)
            peer.publish(str(Topic("cam-1", Kind.TELEMETRY)), encode(m))
        # An outbox resend of a window already stored counts nowhere.
        peer.publish(str(Topic("cam-1", Kind.TELEMETRY)), encode(telemetry("cam-1", 0, BUCKET_MS + 1)))

        def rollups() -> list[dict[str, Any]] | None:
            rows: list[dict[str, Any]] = ctl.api(
                "GET", "/v1/telemetry/rollups", params={"device": "cam-1"}
            ).json()
            return rows if sum(r["windows"] for r in rows) == n else None

        rows = wait_until(rollups, 20, "every window rolled up")
    finally:
        peer.close()
    assert [r["bucket_start_ms"] for r in rows] == [3 * BUCKET_MS, 2 * BUCKET_MS, BUCKET_MS]
    assert all(r["inference_count"] == 1000 and r["error_count"] == 50 for r in rows)
    assert all(r["latency_p50_ms"] == pytest.approx(2.0) for r in rows)
    assert rows[0]["latency_p99_ms"] == 299.0
    assert len(ctl.api("GET", "/v1/devices/cam-1/telemetry", params={"limit": 1000}).json()) == n

    assert ctl.client.get("/metrics").status_code == 401
    assert ctl.client.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    text = ctl.api("GET", "/metrics").text
    assert "edgefleet_devices 1.0" in text
    assert "edgefleet_devices_online" in text and "edgefleet_retraining_runs" in text


def test_drift_against_a_reference_baseline_per_device_and_fleet(
    ctl: Ctl, digits: tuple[Path, np.ndarray, np.ndarray]
) -> None:
    path, x, probs = digits
    assert ctl.upload(path, "digits", "1").status_code == 201
    assert ctl.api("GET", "/v1/models/digits/versions/1/drift").status_code == 404
    reference = {"inputs": x[:150].tolist(), "probabilities": probs[:150].tolist()}
    r = ctl.api(
        "PUT", "/v1/models/digits/versions/1/drift/baseline", json={"reference": reference, "bins": 5}
    )
    assert r.status_code == 200, r.text
    assert r.json()["ready"] and r.json()["samples"] == 150 and r.json()["source"] == "reference"
    bad = ctl.api(
        "PUT",
        "/v1/models/digits/versions/1/drift/baseline",
        json={"reference": reference, "production": {"windows": 2, "spec": {"features": {}}}},
    )
    assert bad.status_code == 422 and "exactly one" in bad.text
    spec = ParseDict(ctl.api("GET", "/v1/models/digits/versions/1/drift/spec").json(), fleet_pb2.DriftSpec())
    assert len(spec.features) == 64 and spec.num_classes == 10

    steady, drifting = device(ctl, "cam-ok"), device(ctl, "cam-drift")
    try:
        for seq, end in enumerate((BUCKET_MS + 5, 2 * BUCKET_MS + 5)):
            for peer, name, inputs in ((steady, "cam-ok", x[150:]), (drifting, "cam-drift", 16.0 - x[150:])):
                m = telemetry(name, seq, end, inference_count=len(inputs))
                m.drift.append(build_sketch(spec, inputs, probs[150:]))
                peer.publish(str(Topic(name, Kind.TELEMETRY)), encode(m))

        def scored() -> dict[str, Any] | None:
            body: dict[str, Any] = ctl.api("GET", "/v1/models/digits/versions/1/drift").json()
            return body if len(body["fleet"]) == 2 and len(body["devices"]) == 2 else None

        body = wait_until(scored, 20, "drift scored")
    finally:
        steady.close()
        drifting.close()
    assert body["devices"]["cam-ok"]["psi"] < 0.25 < body["devices"]["cam-drift"]["psi"]
    assert body["devices"]["cam-drift"]["kl"] > body["devices"]["cam-ok"]["kl"]
    assert all(w["devices"] == 2 and w["samples"] == 2 * 147 for w in body["fleet"])
    assert body["fleet"][0]["window_start_ms"] == BUCKET_MS
    per_device = ctl.api("GET", "/v1/models/digits/versions/1/drift/devices/cam-drift").json()
    assert len(per_device) == 2 and per_device[0]["psi"] == pytest.approx(body["devices"]["cam-drift"]["psi"])
    assert ctl.api("GET", "/v1/models/digits/versions/1/drift/devices/nobody").status_code == 404


def chunks_of(
    data: bytes, size: int, upload_id: str, digest: str | None = None
) -> list[fleet_pb2.CaptureChunk]:
    parts = [data[i : i + size] for i in range(0, len(data), size)]
    return [
        fleet_pb2.CaptureChunk(
            upload_id=upload_id,
            tenant="default",
            model_name="digits",
            model_version="1",
            policy_id="low-confidence",
            index=i,
            count=len(parts),
            data=p,
            sha256=digest or hashlib.sha256(data).hexdigest(),
            size=len(data),
            start_ms=1000,
            end_ms=2000,
            samples=4,
            reasons={"low_confidence": 3, "random": 1},
        )
        for i, p in enumerate(parts)
    ]


def test_captured_chunks_become_a_content_addressed_data_set(ctl: Ctl) -> None:
    buf = io.BytesIO()
    np.savez(buf, inputs=np.arange(4 * 64, dtype=np.float32).reshape(4, 64), probabilities=np.eye(4, 10))
    data = buf.getvalue()
    peer = device(ctl, "cam-cap")
    topic = str(Topic("cam-cap", Kind.CAPTURE))
    try:
        corrupt = chunks_of(data, 700, "bad-1", digest="0" * 64)
        good = chunks_of(data, 700, "up-1")
        # Out of order and with a resend; the corrupt upload is complete first and must vanish.
        for chunk in [*corrupt, good[2], good[0], good[0], *good[1:]]:
            assert not peer.publish(topic, encode(chunk)).is_failure
        listed = wait_until(lambda: ctl.api("GET", "/v1/datasets").json(), 20, "data set stored")
    finally:
        peer.close()
    digest = hashlib.sha256(data).hexdigest()
    assert [d["digest"] for d in listed] == [digest]
    ds = listed[0]
    assert ds["samples"] == 4 and not ds["labelled"]
    assert ds["manifest"] == {
        "device_id": "cam-cap",
        "tenant": "default",
        "model_name": "digits",
        "model_version": "1",
        "policy_id": "low-confidence",
        "start_ms": 1000,
        "end_ms": 2000,
        "reasons": {"low_confidence": 3, "random": 1},
    }
    assert ctl.api("GET", f"/v1/datasets/{digest}/download").content == data
    assert ctl.api("PUT", f"/v1/datasets/{digest}/labels", json={"labels": [0, 1]}).status_code == 422
    labelled = ctl.api("PUT", f"/v1/datasets/{digest}/labels", json={"labels": [0, 1, 2, 9]}).json()
    assert labelled["labelled"] and len(labelled["labels_digest"]) == 64
    assert ctl.api("GET", f"/v1/datasets/{digest}/labels").json() == {"labels": [0, 1, 2, 9]}
    assert ctl.api("GET", "/v1/datasets/" + "f" * 64).status_code == 404
    staging = ctl.settings.data_dir / "datasets" / "staging" / "cam-cap"
    assert not any(staging.glob("*/*.part"))


def test_closed_loop_cli_and_the_scrape_token(broker: Broker, tmp_path: Path) -> None:
    controller = LocalController(
        tmp_path / "ctl", broker.port, passwd_file=broker.passwd_file, reload_command=broker.reload_command
    )
    controller.init()
    settings_file = controller.data_dir / "controller.toml"
    text = settings_file.read_text().replace(
        'metrics_token_sha256 = ""', f'metrics_token_sha256 = "{hash_token("scrape-me")}"'
    )
    assert "scrape" not in text and hash_token("scrape-me") in text
    settings_file.write_text(text)
    controller.start()
    try:
        digits = digits_classifier(tmp_path / "digits.onnx")
        controller.cli("models", "upload", str(digits.path), "--name", "digits", "--version", "1")
        reference = tmp_path / "reference.npz"
        np.savez(reference, inputs=digits.samples[:100])
        baseline = controller.cli(
            "drift", "baseline", "digits", "1", "--reference", str(reference), "--bins", "4"
        )
        assert baseline["ready"] and baseline["samples"] == 100
        (ref,) = controller.cli("datasets", "list", "--model", "digits")
        assert ref["manifest"]["policy_id"] == "reference"
        labels = tmp_path / "labels.json"
        labels.write_text(json.dumps(digits.labels[:100].tolist()))
        assert controller.cli("datasets", "label", ref["digest"], "--labels", str(labels))["labelled"]
        out = tmp_path / "copy.npz"
        controller.cli("datasets", "download", ref["digest"], "-o", str(out))
        assert hashlib.sha256(out.read_bytes()).hexdigest() == ref["digest"]
        assert controller.cli("drift", "show", "digits", "1")["fleet"] == []
        capture = controller.cli("datasets", "capture-policy", "digits", "--drifted-feature-share", "0.3")
        assert capture["version"] == 1 and capture["drifted_feature_share"] == 0.3
        assert controller.cli("datasets", "capture-policy", "digits")["policy_id"] == capture["policy_id"]
        policy = tmp_path / "policy.json"
        policy.write_text(json.dumps({"model": "digits", "conditions": {"accuracy": {"below": 0.5}},
                                      "trigger": {"kind": "command", "command": ["true"]}}))  # fmt: skip
        assert controller.cli("retraining", "put-policy", "acc", "--file", str(policy))["version"] == 1
        assert [p["name"] for p in controller.cli("retraining", "policies")] == ["acc"]
        assert controller.cli("retraining", "runs") == []
        policy.write_text(json.dumps({"model": "digits", "conditions": {"accuracy": {"below": 0.5}}}))
        refused = controller.cli("retraining", "put-policy", "acc", "--file", str(policy), check=False)
        assert refused.returncode == 1 and "422: body.trigger: Field required" in refused.stderr

        assert httpx.get(f"{controller.url}/metrics", timeout=10).status_code == 401
        scraped = httpx.get(
            f"{controller.url}/metrics", headers={"Authorization": "Bearer scrape-me"}, timeout=10
        )
        assert scraped.status_code == 200 and "edgefleet_devices 0.0" in scraped.text
        # The scrape token opens /metrics only: its role (metrics) is below every other route's.
        assert (
            httpx.get(
                f"{controller.url}/v1/datasets", headers={"Authorization": "Bearer scrape-me"}
            ).status_code
            == 403
        )
    finally:
        controller.stop()


def test_a_calibration_set_uploaded_with_the_version_becomes_its_drift_baseline(
    ctl: Ctl, digits: tuple[Path, np.ndarray, np.ndarray]
) -> None:
    path, x, probs = digits
    calibration = io.BytesIO()
    np.savez(calibration, X=x[:120])
    with path.open("rb") as model:
        uploaded = ctl.api(
            "POST",
            "/v1/models/digits/versions",
            data={"version": "7"},
            files={"file": ("d.onnx", model), "calibration": ("c.npz", calibration.getvalue())},
        )
    assert uploaded.status_code == 201, uploaded.text
    ctl.controller.closed_loop.tick()
    baseline = ctl.api("GET", "/v1/models/digits/versions/7/drift/baseline").json()
    assert baseline["source"] == "reference" and baseline["ready"] and baseline["samples"] == 120
    assert baseline["spec"]["num_classes"] == 10 and len(baseline["spec"]["features"]) == 64
    spec = ParseDict(ctl.api("GET", "/v1/models/digits/versions/7/drift/spec").json(), fleet_pb2.DriftSpec())
    same = build_sketch(spec, x[:120], probs[:120])
    device_sketch = baselines_sketch(same)
    stored = ctl.controller.closed_loop.baselines.get("digits", "7").sketch
    assert stored is not None and stored.classes == device_sketch.classes
    assert stored.confidence == device_sketch.confidence and stored.features == device_sketch.features
