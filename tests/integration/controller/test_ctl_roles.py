"""Operator tokens with roles, checked in one place for every route, and the audit log."""

from __future__ import annotations

import time
from pathlib import Path

from fastapi import APIRouter
from fastapi.routing import APIRoute, iter_route_contexts

from controller.api.broker_auth import broker_secret
from controller.api.deps import PUBLIC, authorize, required_role
from controller.auth import Role
from tests.support.controller_process import Ctl

# Routes outside the role check on purpose: the API document and its viewers, and the
# console's static assets (the login page needs them before anyone has logged in).
PROFILES = Path(__file__).resolve().parents[3] / "firmware_profiles"
OPEN_ROUTES = {"/openapi.json", "/docs/assets", "/ui/static"}
BROKER_ROUTES = {"/broker/authenticate", "/broker/authorize"}
# The only operations declared public: the console's login and the API document's viewer,
# and the broker's questions, which take the broker secret instead of an operator token.
PUBLIC_OPERATIONS = {
    ("GET", "/ui/login"),
    ("POST", "/ui/login"),
    ("GET", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    *(("POST", path) for path in BROKER_ROUTES),
}
UNAUTHENTICATED = {"detail": "missing, invalid, expired or revoked bearer token"}


def test_every_route_of_the_app_has_a_minimum_role_checked_by_the_app_wide_dependency(ctl: Ctl) -> None:
    table: dict[tuple[str, str], str] = {}
    for route in iter_route_contexts(ctl.client.app.routes):  # type: ignore[attr-defined]
        if isinstance(route.original_route, APIRoute):
            calls = {d.call for d in route.dependant.dependencies}
            assert authorize in calls, f"{route.path} is not behind the role check"
            for method in sorted(route.methods or ()):
                table[(method, str(route.path))] = str(required_role(route))
        else:
            assert route.path in OPEN_ROUTES, f"{route.path} bypasses the role check"
    print("\n".join(f"{m:6} {p:60} {r}" for (m, p), r in sorted(table.items(), key=lambda kv: kv[0][::-1])))
    assert len(table) >= 60
    assert all(r in {*Role, PUBLIC} for r in table.values())
    assert {k for k, r in table.items() if r == PUBLIC} == PUBLIC_OPERATIONS
    for (method, path), role in table.items():
        if role == PUBLIC:
            continue
        if method == "GET" and path not in {"/v1/tokens", "/v1/audit", "/ui/audit", "/metrics"}:
            assert role == Role.VIEWER, (method, path, role)
        elif method != "GET":
            assert role in (Role.OPERATOR, Role.ADMIN) or path == "/ui/logout", (method, path, role)
    for route in iter_route_contexts(ctl.client.app.routes):  # type: ignore[attr-defined]
        if route.path in BROKER_ROUTES:
            assert broker_secret in {d.call for d in route.dependant.dependencies}, route.path
    admin_only = {k for k, r in table.items() if r == Role.ADMIN}
    assert admin_only == {
        ("POST", "/v1/devices"),
        ("POST", "/v1/device-batches"),
        ("POST", "/v1/devices/{device_id}/certificate"),
        ("POST", "/v1/devices/{device_id}/revoke"),
        ("POST", "/v1/signing-key/rotate"),
        ("POST", "/v1/tokens"),
        ("GET", "/v1/tokens"),
        ("DELETE", "/v1/tokens/{token_id}"),
    }
    assert table[("GET", "/metrics")] == Role.METRICS
    assert table[("POST", "/v1/rollouts/{rollout_id}/pause")] == Role.OPERATOR


def test_a_router_added_without_any_auth_declaration_is_protected(ctl: Ctl) -> None:
    added = APIRouter()

    @added.get("/added")
    def read() -> dict[str, str]:
        return {"read": "ok"}

    @added.post("/added")
    def change() -> dict[str, str]:
        return {"changed": "ok"}

    # The way create_app includes every router of the API.
    ctl.client.app.include_router(added, prefix="/v1")  # type: ignore[attr-defined]
    for method in ("GET", "POST"):
        refused = ctl.client.request(method, "/v1/added")
        assert refused.status_code == 401 and refused.json() == UNAUTHENTICATED, refused.text
        assert refused.headers["www-authenticate"] == "Bearer"
        assert _as(ctl, "not-a-token", method, "/v1/added") == 401
    viewer = _token(ctl, "vera", "viewer")
    assert _as(ctl, viewer["token"], "GET", "/v1/added") == 200
    assert _as(ctl, viewer["token"], "POST", "/v1/added") == 403
    assert ctl.api("POST", "/v1/added").json() == {"changed": "ok"}


def _token(ctl: Ctl, name: str, role: str, **extra: object) -> dict[str, object]:
    response = ctl.api("POST", "/v1/tokens", json={"name": name, "role": role, **extra})
    assert response.status_code == 201, response.text
    body: dict[str, object] = response.json()
    return body


def _as(ctl: Ctl, token: object, method: str, path: str, **kwargs: object) -> int:
    response = ctl.client.request(method, path, headers={"Authorization": f"Bearer {token}"}, **kwargs)  # type: ignore[arg-type]
    return response.status_code


def test_roles_are_ordered_and_a_revoked_or_expired_token_is_refused(ctl: Ctl) -> None:
    viewer = _token(ctl, "vera", "viewer")
    operator = _token(ctl, "otto", "operator")
    assert "token" in viewer and viewer["role"] == "viewer"
    listed = ctl.api("GET", "/v1/tokens").json()
    assert {t["name"] for t in listed} == {"vera", "otto"} and all("token" not in t for t in listed)

    assert _as(ctl, viewer["token"], "GET", "/v1/devices") == 200
    assert _as(ctl, viewer["token"], "GET", "/v1/whoami") == 200
    assert _as(ctl, viewer["token"], "POST", "/v1/rollouts/nope/pause") == 403
    assert _as(ctl, viewer["token"], "GET", "/v1/audit") == 403
    # An operator passes the role check and meets the domain's answer (no such rollout).
    assert _as(ctl, operator["token"], "POST", "/v1/rollouts/nope/pause") == 404
    assert _as(ctl, operator["token"], "POST", "/v1/devices", json={"device_id": "d1", "tags": []}) == 403
    assert _as(ctl, operator["token"], "POST", "/v1/tokens", json={"name": "x", "role": "admin"}) == 403
    assert _as(ctl, operator["token"], "GET", "/metrics") == 200
    assert _as(ctl, viewer["token"], "GET", "/metrics") == 200

    refused = ctl.client.post(
        "/v1/rollouts/nope/pause", headers={"Authorization": f"Bearer {viewer['token']}"}
    ).json()
    assert "vera" in refused["detail"] and "operator" in refused["detail"]

    assert ctl.api("DELETE", f"/v1/tokens/{viewer['id']}").json()["revoked_at"] is not None
    assert _as(ctl, viewer["token"], "GET", "/v1/devices") == 401
    assert ctl.api("DELETE", "/v1/tokens/missing").status_code == 404

    short = _token(ctl, "temp", "operator", expires_in_s=60)
    assert _as(ctl, short["token"], "GET", "/v1/devices") == 200
    accounts = ctl.controller.accounts
    real_clock = accounts.clock
    accounts.clock = lambda: real_clock() + 61
    try:
        assert _as(ctl, short["token"], "GET", "/v1/devices") == 401
    finally:
        accounts.clock = real_clock

    bad = ctl.api("POST", "/v1/tokens", json={"name": "x", "role": "root"})
    assert bad.status_code == 422 and "role" in bad.text
    assert ctl.api("POST", "/v1/tokens", json={"name": "bad name!", "role": "viewer"}).status_code == 422
    assert len(ctl.api("GET", "/v1/tokens").json()) == 3


def test_every_state_changing_request_is_audited_with_who_what_and_the_result(ctl: Ctl) -> None:
    operator = _token(ctl, "otto", "operator")
    viewer = _token(ctl, "vera", "viewer")
    started = time.time()
    ctl.register("dev-1", ["site-a"])
    profile = PROFILES / "coral-dev-board.toml"
    body = {"source": profile.read_text(), "filename": profile.name}
    assert _as(ctl, operator["token"], "POST", "/v1/profiles", json=body) == 201
    assert _as(ctl, viewer["token"], "POST", "/v1/rollouts/r-9/abort") == 403
    assert _as(ctl, "not-a-token", "POST", "/v1/rollouts/r-9/abort") == 401
    assert _as(ctl, operator["token"], "GET", "/v1/devices") == 200

    response = ctl.client.get("/v1/audit", headers={"Authorization": f"Bearer {operator['token']}"})
    assert response.status_code == 200
    entries = response.json()
    seen = [(e["actor"], e["method"], e["route"], e["target"], e["status"]) for e in entries]
    assert seen[:5] == [
        ("anonymous", "POST", "/v1/rollouts/{rollout_id}/abort", {"rollout_id": "r-9"}, 401),
        ("vera", "POST", "/v1/rollouts/{rollout_id}/abort", {"rollout_id": "r-9"}, 403),
        ("otto", "POST", "/v1/profiles", {}, 201),
        ("admin", "POST", "/v1/devices", {}, 201),
        ("admin", "POST", "/v1/tokens", {}, 201),
    ]
    assert all(e["at"] >= started for e in entries[:4])
    assert entries[2]["role"] == "operator" and entries[2]["via"] == "bearer"
    assert all(e["method"] != "GET" for e in entries)
    assert ctl.api("GET", "/v1/audit", params={"actor": "vera"}).json()[0]["status"] == 403


def test_console_session_is_httponly_strict_and_needs_csrf_for_changes(ctl: Ctl) -> None:
    operator = _token(ctl, "otto", "operator")
    assert ctl.client.get("/ui", follow_redirects=False).headers["location"] == "/ui/login?next=/ui"
    wrong = ctl.client.post("/ui/login", data={"token": "nope"}, follow_redirects=False)
    assert wrong.status_code == 401 and "unknown, expired or revoked token" in wrong.text
    login = ctl.client.post(
        "/ui/login",
        data={"token": operator["token"], "next": "https://evil.example/"},
        follow_redirects=False,
    )
    assert login.status_code == 303 and login.headers["location"] == "/ui"
    cookie = login.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie

    page = ctl.client.get("/ui")
    assert page.status_code == 200 and "otto (operator)" in page.text
    csrf = page.text.split('name="csrf-token" content="')[1].split('"')[0]
    assert len(csrf) > 20
    assert ctl.client.post("/v1/rollouts/nope/pause").status_code == 403
    assert ctl.client.post("/v1/rollouts/nope/pause", headers={"X-CSRF-Token": "forged"}).status_code == 403
    assert ctl.client.post("/v1/rollouts/nope/pause", headers={"X-CSRF-Token": csrf}).status_code == 404
    assert ctl.client.get("/v1/devices").status_code == 200

    audited = ctl.api("GET", "/v1/audit").json()
    assert (audited[0]["actor"], audited[0]["via"], audited[0]["status"]) == ("otto", "console", 404)
    logins = [(e["actor"], e["status"]) for e in audited if e["route"] == "/ui/login"]
    assert logins == [("otto", 303), ("anonymous", 401)]
    forged = [e for e in audited if e["route"] == "/v1/rollouts/{rollout_id}/pause" and e["status"] == 403]
    assert [e["actor"] for e in forged] == ["otto", "otto"]

    ctl.api("DELETE", f"/v1/tokens/{operator['id']}")
    assert ctl.client.get("/ui", follow_redirects=False).status_code == 303
    assert ctl.client.get("/v1/devices").status_code == 401
