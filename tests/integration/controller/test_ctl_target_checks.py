"""What a rollout or a policy names is checked when it is saved: a shadow phase on a device
with no live model in the tenant is refused for that device (skipped, saying why), and a
retraining policy's rollout naming an unknown device is refused (422 naming it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgefleet_proto import fleet_pb2
from edgefleet_proto.codec import encode
from edgefleet_proto.topics import Kind, Topic

from tests.support.controller_process import Ctl
from tests.support.waiting import wait_until

SECRET = "target-check-secret-0123"
SHADOW = {"shadow": {"soak_s": 30, "min_agreement": 0.9}}


def live_in(ctl: Ctl, device_id: str, credentials: dict[str, Any], tenant: str) -> None:
    """Put digits 1 live on the device in ``tenant``: a plain rollout the device reports done."""
    body = {"model": "digits", "version": "1", "tenant": tenant, "devices": [device_id]}
    created = ctl.api("POST", "/v1/rollouts", json=body)
    assert created.status_code == 201, created.text
    rollout = created.json()
    digest = ctl.api("GET", "/v1/models/digits/versions/1").json()["digest"]
    reported = fleet_pb2.ReportedState(
        device_id=device_id, desired_generation=1, applied_generation=1, reported_at_ms=5
    )
    reported.models.add(
        tenant=tenant, model_name="digits", model_version="1", artifact_digest=digest, phase=4,
        rollout_id=rollout["id"],
    )  # fmt: skip
    peer = ctl.device_peer(credentials)
    try:
        peer.publish(str(Topic(device_id, Kind.REPORTED)), encode(reported), retain=True)
        wait_until(
            lambda: ctl.api("GET", f"/v1/rollouts/{rollout['id']}").json()["state"] == "succeeded",
            30,
            "the plain rollout to succeed",
        )
    finally:
        peer.close()


def test_a_shadow_phase_skips_devices_without_a_live_model_in_the_tenant(
    ctl: Ctl, digits_model: Path
) -> None:
    assert ctl.upload(digits_model, "digits", "1").status_code == 201
    door = ctl.register("cam-door")
    ctl.register("cam-new")
    live_in(ctl, "cam-door", door, "door")

    # Only devices without the tenant: nothing could run the shadow, so nothing starts.
    alone = {"model": "digits", "version": "1", "tenant": "door", "devices": ["cam-new"], **SHADOW}
    refused = ctl.api("POST", "/v1/rollouts", json=alone)
    assert refused.status_code == 422, refused.text
    assert "cam-new: no model is live in tenant door" in refused.json()["detail"]

    both = {**alone, "devices": ["cam-door", "cam-new"]}
    created = ctl.api("POST", "/v1/rollouts", json=both)
    assert created.status_code == 201, created.text
    devices = {d["device_id"]: d for d in created.json()["devices"]}
    assert devices["cam-new"]["status"] == "skipped"
    assert "no model is live in tenant door" in devices["cam-new"]["detail"]
    assert devices["cam-door"]["status"] != "skipped"


def test_a_retraining_policy_naming_an_unknown_device_is_refused(ctl: Ctl, digits_model: Path) -> None:
    assert ctl.upload(digits_model, "digits", "1").status_code == 201
    ctl.register("cam-1")
    policy = {
        "model": "digits",
        "conditions": {"drift": {"threshold": 0.25}},
        "trigger": {"kind": "webhook", "url": "http://127.0.0.1:9/", "secret": SECRET},
        "rollout": {"devices": ["cam-1", "ghost"], "waves": [{"count": 1}, {"percent": 100}]},
    }
    refused = ctl.api("PUT", "/v1/retraining/policies/digits-drift", json=policy)
    assert refused.status_code == 422, refused.text
    assert "unknown devices: ghost" in refused.json()["detail"]
    target = {**policy, "rollout": {"target": {"devices": ["ghost-2"]}}}
    refused = ctl.api("PUT", "/v1/retraining/policies/digits-drift", json=target)
    assert refused.status_code == 422 and "ghost-2" in refused.json()["detail"], refused.text
    assert ctl.api("GET", "/v1/retraining/policies").json() == []

    policy["rollout"]["devices"] = ["cam-1"]
    assert ctl.api("PUT", "/v1/retraining/policies/digits-drift", json=policy).status_code == 200
