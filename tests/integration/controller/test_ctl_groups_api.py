"""Device groups, maintenance windows, group targets, scheduled starts and retry-failed through
the REST API over real mosquitto and SQLite; the rollout engine's clock is the one fake."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from tests.support.controller_process import Ctl

# The API and its storage on both databases (tests/conftest.py's store_url, through the ctl fixture).
pytestmark = pytest.mark.both_backends

PARIS = ZoneInfo("Europe/Paris")
AFTERNOON = datetime(2026, 12, 7, 14, 30, tzinfo=PARIS).timestamp()
NIGHT = datetime(2026, 12, 8, 2, 30, tzinfo=PARIS).timestamp()


def ok(response: Any, code: int = 200) -> Any:
    assert response.status_code == code, response.text
    return response.json()


@pytest.fixture
def fleet(ctl: Ctl) -> Ctl:
    for device_id, tags in (("cam-1", ["site-a"]), ("cam-2", ["site-a"]), ("cam-3", ["site-b"])):
        ctl.register(device_id, tags)
    return ctl


def test_groups_static_and_dynamic_through_the_api(fleet: Ctl) -> None:
    ctl = fleet
    static = ok(ctl.api("POST", "/v1/groups", json={"name": "pilot", "devices": ["cam-3", "cam-1"]}), 201)
    assert (static["kind"], static["devices"], static["query"]) == ("static", ["cam-1", "cam-3"], None)
    dynamic = ok(ctl.api("POST", "/v1/groups", json={"name": "site-a", "query": {"tags": ["site-a"]}}), 201)
    assert (dynamic["kind"], dynamic["devices"]) == ("dynamic", ["cam-1", "cam-2"])
    ctl.register("cam-4", ["site-a"])
    assert ok(ctl.api("GET", "/v1/groups/site-a"))["devices"] == ["cam-1", "cam-2", "cam-4"]
    assert ok(ctl.api("POST", "/v1/groups/pilot/devices", json={"devices": ["cam-2"]}))["devices"] == [
        "cam-1",
        "cam-2",
        "cam-3",
    ]
    assert ok(ctl.api("DELETE", "/v1/groups/pilot/devices/cam-3"))["devices"] == ["cam-1", "cam-2"]
    replaced = ok(ctl.api("PUT", "/v1/groups/pilot", json={"query": {"tags": ["site-b"]}}))
    assert (replaced["kind"], replaced["devices"]) == ("dynamic", ["cam-3"])
    assert [g["name"] for g in ok(ctl.api("GET", "/v1/groups"))] == ["pilot", "site-a"]
    assert ok(ctl.api("DELETE", "/v1/groups/pilot"))["name"] == "pilot"
    assert ctl.api("GET", "/v1/groups/pilot").status_code == 404


@pytest.mark.parametrize(
    ("method", "path", "body", "code", "named"),
    [
        ("POST", "/v1/groups", {"name": "g", "devices": ["cam-1", "ghost"]}, 422, "unknown devices: ghost"),
        ("POST", "/v1/groups", {"name": "g", "query": {}}, 422, "needs tags, a profile"),
        ("POST", "/v1/groups", {"name": "g", "query": {"profile": "toaster"}}, 422, "unknown profile toaster"),
        ("POST", "/v1/groups", {"name": "bad name", "devices": []}, 422, "body.name"),
        ("POST", "/v1/groups", {"name": "site-a", "devices": []}, 409, "site-a exists already"),
        ("PUT", "/v1/groups/nope", {"devices": []}, 404, "unknown group nope"),
        ("POST", "/v1/groups/site-a/devices", {"devices": ["cam-3"]}, 422, "dynamic"),
        ("POST", "/v1/maintenance-windows", {"group": "site-a", "cron": "0 25 * * *", "duration_s": 60}, 422,
         "cron '0 25 * * *'"),
        ("POST", "/v1/maintenance-windows",
         {"group": "site-a", "cron": "0 2 * * *", "duration_s": 60, "timezone": "Europe/Atlantis"}, 422,
         "unknown time zone 'Europe/Atlantis'"),
        ("POST", "/v1/maintenance-windows", {"group": "nope", "cron": "0 2 * * *", "duration_s": 60}, 422,
         "unknown group nope"),
        ("POST", "/v1/maintenance-windows", {"device_id": "ghost", "cron": "0 2 * * *", "duration_s": 60}, 422,
         "unknown device ghost"),
        ("POST", "/v1/maintenance-windows",
         {"group": "site-a", "device_id": "cam-1", "cron": "0 2 * * *", "duration_s": 60}, 422, "exactly one"),
        ("POST", "/v1/maintenance-windows", {"group": "site-a", "cron": "0 2 * * *", "duration_s": 0}, 422,
         "duration_s"),
        ("DELETE", "/v1/maintenance-windows/nope", None, 404, "unknown maintenance window nope"),
    ],
)  # fmt: skip
def test_bad_groups_and_windows_are_refused_naming_the_problem_and_nothing_is_stored(
    fleet: Ctl, method: str, path: str, body: dict[str, Any] | None, code: int, named: str
) -> None:
    ctl = fleet
    ok(ctl.api("POST", "/v1/groups", json={"name": "site-a", "query": {"tags": ["site-a"]}}), 201)
    before = ok(ctl.api("GET", "/v1/groups"))
    response = ctl.api(method, path, json=body)
    assert response.status_code == code, response.text
    assert named in response.json()["detail"]
    assert ok(ctl.api("GET", "/v1/groups")) == before
    assert ok(ctl.api("GET", "/v1/maintenance-windows")) == []


def test_windows_say_when_they_open_by_the_engine_clock(fleet: Ctl) -> None:
    ctl = fleet
    ctl.controller.rollouts.clock = lambda: AFTERNOON
    ok(ctl.api("POST", "/v1/groups", json={"name": "site-a", "query": {"tags": ["site-a"]}}), 201)
    body = {"group": "site-a", "cron": "0 2 * * *", "duration_s": 7200, "timezone": "Europe/Paris"}
    window = ok(ctl.api("POST", "/v1/maintenance-windows", json=body), 201)
    assert (window["open"], window["next_open"], window["opens_at"]) == (
        False,
        "2026-12-08T02:00+01:00",
        NIGHT - 1800,
    )
    own = ok(
        ctl.api(
            "POST",
            "/v1/maintenance-windows",
            json={"device_id": "cam-2", "cron": "@hourly", "duration_s": 60},
        ),
        201,
    )
    assert [w["id"] for w in ok(ctl.api("GET", "/v1/groups/site-a"))["windows"]] == [window["id"]]
    cam1 = ok(ctl.api("GET", "/v1/devices/cam-1/maintenance"))
    assert (cam1["open"], cam1["reason"]) == (
        False,
        "waiting for maintenance window (next opens 2026-12-08T02:00+01:00)",
    )
    assert [w["id"] for w in ok(ctl.api("GET", "/v1/devices/cam-2/maintenance"))["windows"]] == [own["id"]]
    assert ok(ctl.api("GET", "/v1/devices/cam-3/maintenance"))["open"] is True
    assert ctl.api("GET", "/v1/devices/ghost/maintenance").status_code == 404
    ctl.controller.rollouts.clock = lambda: NIGHT
    assert ok(ctl.api("GET", f"/v1/maintenance-windows/{window['id']}"))["open"] is True
    assert [w["id"] for w in ok(ctl.api("GET", "/v1/maintenance-windows?device_id=cam-2"))] == [own["id"]]
    ok(ctl.api("DELETE", f"/v1/maintenance-windows/{own['id']}"))
    assert [w["id"] for w in ok(ctl.api("GET", "/v1/maintenance-windows"))] == [window["id"]]


def test_group_target_scheduled_start_and_their_refusals(fleet: Ctl, digits_model: Path) -> None:
    ctl = fleet
    ctl.upload(digits_model, "digits", "1")
    ok(ctl.api("POST", "/v1/groups", json={"name": "site-a", "query": {"tags": ["site-a"]}}), 201)
    ok(ctl.api("POST", "/v1/groups", json={"name": "empty", "devices": []}), 201)
    base = {"model": "digits", "version": "1"}
    for target, named in (
        ({"group": "nope"}, "unknown group nope"),
        ({"group": "empty"}, "group empty has no devices"),
    ):
        refused = ctl.api("POST", "/v1/rollouts", json={**base, "target": target})
        assert refused.status_code == 422 and named in refused.json()["detail"], refused.text
    naive = ctl.api(
        "POST",
        "/v1/rollouts",
        json={**base, "target": {"group": "site-a"}, "start_at": "2030-01-01T02:00:00"},
    )
    assert naive.status_code == 422 and "start_at" in naive.json()["detail"], naive.text
    assert ok(ctl.api("GET", "/v1/rollouts")) == []
    body = {**base, "target": {"group": "site-a"}, "start_at": "2030-01-01T02:00:00+01:00"}
    rollout = ok(ctl.api("POST", "/v1/rollouts", json=body), 201)
    assert [d["device_id"] for d in rollout["devices"]] == ["cam-1", "cam-2"]
    assert rollout["plan"]["start_at"] == datetime(2030, 1, 1, 1, tzinfo=ZoneInfo("UTC")).timestamp()
    assert {d["detail"] for d in rollout["devices"]} == {
        "wave 1; rollout scheduled to start at 2030-01-01T01:00:00+00:00"
    }
    retry = ctl.api("POST", f"/v1/rollouts/{rollout['id']}/retry-failed")
    assert retry.status_code == 409 and "no failed device" in retry.json()["detail"]
    assert ctl.api("POST", "/v1/rollouts/nope/retry-failed").status_code == 404


def test_group_and_window_changes_need_an_operator_and_are_audited(fleet: Ctl) -> None:
    ctl = fleet
    tokens = {
        role: ok(ctl.api("POST", "/v1/tokens", json={"name": role, "role": role}), 201)["token"]
        for role in ("viewer", "operator")
    }

    def as_(role: str, method: str, path: str, body: Any = None) -> int:
        headers = {"Authorization": f"Bearer {tokens[role]}"}
        return ctl.client.request(method, path, headers=headers, json=body).status_code

    group = {"name": "pilot", "devices": ["cam-1"]}
    window = {"group": "pilot", "cron": "0 2 * * *", "duration_s": 60}
    assert as_("viewer", "POST", "/v1/groups", group) == 403
    assert as_("operator", "POST", "/v1/groups", group) == 201
    assert as_("viewer", "GET", "/v1/groups") == 200
    assert as_("viewer", "POST", "/v1/maintenance-windows", window) == 403
    assert as_("operator", "POST", "/v1/maintenance-windows", window) == 201
    assert as_("viewer", "DELETE", "/v1/groups/pilot") == 403
    assert as_("operator", "DELETE", "/v1/groups/pilot") == 200
    audit = ok(ctl.api("GET", "/v1/audit"))
    lines = [(e["actor"], e["method"], e["route"], e["target"], e["status"]) for e in audit[::-1]]
    assert ("viewer", "POST", "/v1/groups", {}, 403) in lines
    assert ("operator", "POST", "/v1/groups", {}, 201) in lines
    assert ("operator", "POST", "/v1/maintenance-windows", {}, 201) in lines
    assert ("operator", "DELETE", "/v1/groups/{name}", {"name": "pilot"}, 200) in lines


def test_a_retraining_policy_rolling_out_to_an_unknown_group_is_refused(
    fleet: Ctl, digits_model: Path
) -> None:
    ctl = fleet
    ctl.upload(digits_model, "digits", "1")
    policy = {
        "model": "digits",
        "conditions": {"drift": {"threshold": 0.25}},
        "trigger": {"kind": "webhook", "url": "http://127.0.0.1:9/", "secret": "s" * 32},
        "rollout": {"target": {"group": "site-a"}},
    }
    refused = ctl.api("PUT", "/v1/retraining/policies/digits-drift", json=policy)
    assert refused.status_code == 422 and "unknown group site-a" in refused.json()["detail"], refused.text
    assert ok(ctl.api("GET", "/v1/retraining/policies")) == []
    ok(ctl.api("POST", "/v1/groups", json={"name": "site-a", "query": {"tags": ["site-a"]}}), 201)
    assert ok(ctl.api("PUT", "/v1/retraining/policies/digits-drift", json=policy))["name"] == "digits-drift"
