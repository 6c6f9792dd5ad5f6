"""PUT/GET /v1/devices/{id}/tenants over the real app, SQLite and mosquitto."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgefleet_proto.topics import Kind, Topic

from tests.support.controller_calls import desired_seen
from tests.support.controller_process import Ctl
from tests.support.waiting import wait_until

TOKEN = "cam-app-token-0123456789"


def tenant(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": "door",
        "model": "digits",
        "source": {"kind": "synthetic", "options": {"shape": "1,64"}},
        "weight": 2.0,
        "token": TOKEN,
    }
    return doc | over


def test_tenants_are_checked_stored_and_published_without_their_token(ctl: Ctl, digits_model: Path) -> None:
    ctl.upload(digits_model, "digits", "1")
    creds = ctl.register("cam-1")
    path = "/v1/devices/cam-1/tenants"
    for body, problem in (
        ([tenant(id="a.b")], "invalid tenant id 'a.b'"),
        ([tenant(source={"kind": "webcam"})], "unknown source kind 'webcam'"),
        ([tenant(model="ghost")], "unknown model 'ghost'"),
        ([tenant(queue=0)], "queue"),
        ([tenant(), tenant()], "declared twice"),
    ):
        refused = ctl.api("PUT", path, json=body)
        assert refused.status_code == 422 and problem in refused.text, refused.text
    unknown = ctl.api("PUT", "/v1/devices/ghost/tenants", json=[tenant()])
    assert unknown.status_code == 404 and "unknown device ghost" in unknown.text
    assert ctl.api("GET", path).json() == []
    assert ctl.api("GET", "/v1/devices/cam-1").json()["desired_generation"] == 0
    assert ctl.api("GET", "/v1/devices/ghost/tenants").status_code == 404

    put = ctl.api("PUT", path, json=[tenant()])
    assert put.status_code == 200, put.text
    assert TOKEN not in put.text and "token_sha256" not in put.text
    assert put.json()[0]["has_token"] and ctl.api("GET", path).json() == put.json()

    peer = ctl.device_peer(creds)
    try:
        peer.subscribe(str(Topic("cam-1", Kind.DESIRED)))
        desired = wait_until(lambda: desired_seen(peer, "cam-1", 1), 10, "the desired state with the tenant")
    finally:
        peer.close()
    (spec,) = desired.tenants
    assert (spec.tenant, spec.model_name, spec.source.kind, spec.weight) == (
        "door",
        "digits",
        "synthetic",
        2.0,
    )
    assert dict(spec.source.options) == {"shape": "1,64"} and len(spec.token_sha256) == 64
