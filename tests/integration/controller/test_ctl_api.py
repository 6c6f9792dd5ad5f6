"""The REST API against real SQLite, real onnxruntime and a real broker."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from controller.api import create_app
from tests.support.broker import Broker
from tests.support.controller_process import Ctl, init_controller, running

# The API and its storage on both databases (tests/conftest.py's store_url, through the ctl fixture).
pytestmark = pytest.mark.both_backends


def test_every_v1_route_refuses_a_missing_or_wrong_token(ctl: Ctl) -> None:
    paths = ctl.client.get("/openapi.json").json()["paths"]
    routes = [(path, method.upper()) for path, ops in paths.items() for method in ops]
    # Besides /v1/, only the broker's authentication hooks, which take the broker's secret
    # instead of an operator token: an operator token (or none) gets nothing from them.
    broker = [(path, method) for path, method in routes if path.startswith("/broker/")]
    routes = [(path, method) for path, method in routes if not path.startswith("/broker/")]
    assert len(routes) >= 10 and all(path.startswith("/v1/") for path, _ in routes)
    assert {path for path, _ in broker} == {"/broker/authenticate", "/broker/authorize"}
    for path, method in broker:
        for headers in ({}, {"Authorization": f"Bearer {ctl.token}"}, {"X-Broker-Secret": "wrong"}):
            response = ctl.client.request(method, path, headers=headers, json={})
            assert response.status_code == 401, (method, path, headers, response.text)
    for template, method in routes:
        path = re.sub(r"\{[^}]+\}", "x", template)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {ctl.token}"}):
            response = ctl.client.request(method, path, headers=headers)
            assert response.status_code == 401, (method, path, headers, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
    assert ctl.api("GET", "/v1/models").status_code == 200


def test_upload_a_real_model_then_read_it_back(ctl: Ctl, digits_model: Path) -> None:
    response = ctl.upload(digits_model, "digits", "1", metadata='{"task": "digits"}')
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["name"], body["version"], body["format"], body["metadata"]) == (
        "digits",
        "1",
        "onnx",
        {"task": "digits"},
    )
    assert body["size"] == digits_model.stat().st_size and len(body["digest"]) == 64
    assert body["inputs"] == [{"name": "X", "dtype": "float32", "shape": [-1, 64]}]
    assert body["outputs"] == [
        {"name": "label", "dtype": "int64", "shape": [-1]},
        {"name": "probabilities", "dtype": "float32", "shape": [-1, 10]},
    ]
    assert (ctl.settings.artifacts_dir / body["digest"]).read_bytes() == digits_model.read_bytes()
    listed = ctl.api("GET", "/v1/models").json()
    assert listed == [
        {
            "name": "digits",
            "versions": [
                {
                    "version": "1",
                    "digest": body["digest"],
                    "size": body["size"],
                    "created_at": body["created_at"],
                    "stage": "development",
                }
            ],
        }
    ]
    read = ctl.api("GET", "/v1/models/digits/versions/1").json()
    # The background worker may have added the variant's latency meanwhile.
    assert {k: v for k, v in read.items() if k != "variants"} == {
        k: v for k, v in body.items() if k != "variants"
    }
    assert ctl.api("GET", "/v1/models/digits/versions/2").status_code == 404
    again = ctl.upload(digits_model, "digits", "1")
    assert again.status_code == 409 and "already exists" in again.json()["detail"]


def test_bad_uploads_are_refused_and_store_nothing(ctl: Ctl, digits_model: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(digits_model.read_bytes()[:-200])
    response = ctl.upload(truncated, "digits", "1")
    assert response.status_code == 422
    assert "onnx" in response.json()["detail"].lower()
    text = tmp_path / "model.onnx"
    text.write_text("definitely not onnx")
    assert ctl.upload(text, "digits", "1").status_code == 422
    bad_metadata = ctl.upload(digits_model, "digits", "1", metadata="[1, 2]")
    assert bad_metadata.status_code == 422 and "JSON object" in bad_metadata.json()["detail"]
    assert ctl.upload(digits_model, "no spaces please", "1").status_code == 422
    assert ctl.api("GET", "/v1/models").json() == []
    assert list(ctl.settings.artifacts_dir.iterdir()) == []
    assert ctl.controller.store.query("SELECT * FROM model_versions") == []


def test_uploads_over_the_limit_get_413(
    broker: Broker, digits_model: Path, tmp_path: Path, store_url: str
) -> None:
    # A controller of its own: a second one on the same SQLite file would be refused.
    settings, token = init_controller(broker, tmp_path / "controller", database_url=store_url)
    small = settings.with_changes(max_upload_bytes=1000)
    app = create_app(small, start_transport=False)
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        limited = Ctl(small, token, client, broker)
        streamed = limited.upload(
            digits_model, "digits", "1"
        )  # declared size is under the envelope allowance
        assert streamed.status_code == 413 and "1000 bytes" in streamed.json()["detail"]
        huge = tmp_path / "huge.onnx"
        huge.write_bytes(b"\0" * (2 * 1024 * 1024))
        declared = limited.upload(huge, "digits", "1")
        assert declared.status_code == 413
        unauthenticated = client.post("/v1/models/digits/versions", files={"file": ("x", b"x")})
        assert unauthenticated.status_code == 401
    assert list(small.artifacts_dir.iterdir()) == []


def test_devices_register_once_with_valid_ids(ctl: Ctl) -> None:
    creds = ctl.register("cam-1", ["lobby"])
    assert set(creds) == {
        "device_id",
        "mqtt_username",
        "mqtt_password",
        "broker_host",
        "broker_port",
        "mqtt_protocol",
        "controller_public_key",
        "profile",
        "broker_ca_pem",
    }
    assert creds["broker_ca_pem"] == "", "a plain-TCP broker has no CA to hand out"
    assert creds["controller_public_key"] == ctl.controller.signer.public_key_hex
    assert (creds["mqtt_username"], creds["broker_port"], creds["mqtt_protocol"]) == (
        "cam-1",
        ctl.broker.port,
        "v5",
    )
    assert ctl.api("POST", "/v1/devices", json={"device_id": "cam-1"}).status_code == 409
    for bad in ("has/slash", "+", "", "edgefleet-controller"):
        response = ctl.api("POST", "/v1/devices", json={"device_id": bad})
        assert response.status_code == 422, bad
        assert "device id" in response.json()["detail"].replace("_", " ")
    assert ctl.api("POST", "/v1/devices", json={"id": "x"}).status_code == 422
    [device] = ctl.api("GET", "/v1/devices").json()
    assert device["device_id"] == "cam-1" and device["tags"] == ["lobby"]
    assert device["online"] is False and device["last_seen"] is None and device["reported"] is None
    assert ctl.api("GET", "/v1/devices/cam-1").json() == device
    assert ctl.api("GET", "/v1/devices/ghost").status_code == 404
    assert ctl.api("GET", "/v1/devices/ghost/telemetry").status_code == 404
    assert ctl.api("GET", "/v1/devices/ghost/events").status_code == 404
    assert ctl.api("GET", "/v1/devices/cam-1/telemetry?limit=0").status_code == 422


def test_rollouts_with_unknown_targets_name_them(ctl: Ctl, digits_model: Path) -> None:
    ctl.upload(digits_model, "digits", "1")
    ctl.register("cam-1")
    response = ctl.api(
        "POST", "/v1/rollouts", json={"model": "digits", "version": "7", "devices": ["cam-1", "ghost"]}
    )
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "digits 7" in detail and "ghost" in detail and "cam-1" not in detail
    assert ctl.api("GET", "/v1/rollouts").json() == []
    assert ctl.api("GET", "/v1/devices/cam-1").json()["desired_generation"] == 0
    assert ctl.api("GET", "/v1/rollouts/nope").status_code == 404
    created = ctl.api("POST", "/v1/rollouts", json={"model": "digits", "version": "1", "devices": ["cam-1"]})
    assert created.status_code == 201
    rollout = created.json()
    assert (rollout["status"], rollout["tenant"], rollout["devices"][0]["status"]) == (
        "in_progress",
        "default",
        "pending",
    )
    assert ctl.api("GET", f"/v1/rollouts/{rollout['id']}").json() == rollout
    assert ctl.api("GET", "/v1/rollouts").json() == [rollout]


def test_state_survives_a_restart(broker: Broker, ctl: Ctl, digits_model: Path) -> None:
    version = ctl.upload(digits_model, "digits", "1").json()
    ctl.register("cam-1")
    rollout = ctl.api(
        "POST", "/v1/rollouts", json={"model": "digits", "version": "1", "devices": ["cam-1"]}
    ).json()
    ctl.client.__exit__(None, None, None)
    with running(broker, ctl.settings, ctl.token) as again:
        # Variants gain a latency in the background; the version itself is immutable.
        after = again.api("GET", "/v1/models/digits/versions/1").json()
        assert {k: v for k, v in after.items() if k != "variants"} == {
            k: v for k, v in version.items() if k != "variants"
        }
        assert [(v["variant"], v["digest"], v["signature"]) for v in after["variants"]] == [
            (v["variant"], v["digest"], v["signature"]) for v in version["variants"]
        ]
        assert again.api("GET", f"/v1/rollouts/{rollout['id']}").json()["digest"] == version["digest"]
