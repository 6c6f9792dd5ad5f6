"""The console's pages as the controller serves them (real SQLite, real Mosquitto, device
peers publishing what agents publish), read without a browser: what each page shows, what
it lets a role do, and how a session ends. The browser tests drive the same pages."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from edgefleet_proto import fleet_pb2
from edgefleet_proto.codec import encode
from edgefleet_proto.topics import Kind, Topic

from tests.support.controller_process import Ctl
from tests.support.waiting import wait_until

PROFILES = Path(__file__).resolve().parents[3] / "firmware_profiles"
PAGES = ("/ui", "/ui/devices", "/ui/models", "/ui/rollouts", "/ui/drift", "/ui/datasets")


def _token(ctl: Ctl, name: str, role: str, **extra: object) -> str:
    response = ctl.api("POST", "/v1/tokens", json={"name": name, "role": role, **extra})
    assert response.status_code == 201, response.text
    return str(response.json()["token"])


def _login(ctl: Ctl, token: str) -> str:
    """Logs the test client in; returns the session's CSRF token from the page."""
    response = ctl.client.post("/ui/login", data={"token": token}, follow_redirects=False)
    assert response.status_code == 303, response.text
    page = ctl.client.get("/ui").text
    return page.split('name="csrf-token" content="')[1].split('"')[0]


def _profile(ctl: Ctl, filename: str) -> None:
    source = (PROFILES / filename).read_text()
    assert ctl.api("POST", "/v1/profiles", json={"source": source, "filename": filename}).status_code == 201


def _online(ctl: Ctl, credentials: dict[str, object], phase: int = fleet_pb2.MODEL_PHASE_ACTIVE) -> None:
    """A device peer says it is online and reports digits 1 in ``phase`` with a full disk."""
    device_id = str(credentials["device_id"])
    peer = ctl.device_peer(credentials)
    status = fleet_pb2.DeviceStatus(online=True, at_ms=1, agent_version="0.1.0")
    peer.publish(str(Topic(device_id, Kind.STATUS)), encode(status), retain=True)
    reported = fleet_pb2.ReportedState(device_id=device_id, desired_generation=1, reported_at_ms=5)
    reported.models.add(
        tenant="default", model_name="digits", model_version="1", phase=phase, error="corrupt artifact"
    )
    reported.conditions.add(kind="disk_full", message="/var/lib/edgefleet has 0 bytes free", count=3)
    peer.publish(str(Topic(device_id, Kind.REPORTED)), encode(reported), retain=True)
    wait_until(
        lambda: ctl.api("GET", f"/v1/devices/{device_id}").json()["reported"] is not None, 10, "reported"
    )
    peer.close()


def _variants_settled(ctl: Ctl, name: str, version: str) -> bool:
    variants = ctl.api("GET", f"/v1/models/{name}/versions/{version}").json()["variants"]
    return bool(variants) and all(v["status"] in ("ready", "rejected", "failed") for v in variants)


def _rows(html: str, table_id: str) -> list[str]:
    body = html.split(f'id="{table_id}"')[1].split("</tbody>")[0]
    return re.findall(r'data-device="([^"]+)"', body)


def test_every_page_renders_for_a_viewer_from_local_assets_only(
    ctl: Ctl, digits_model: Path, tmp_path: Path
) -> None:
    ctl.register("cam-1", ["site-a"])
    assert ctl.upload(digits_model, "digits", "1").status_code == 201
    rollout = ctl.api("POST", "/v1/rollouts", json={"model": "digits", "version": "1", "devices": ["cam-1"]})
    _login(ctl, _token(ctl, "vera", "viewer"))

    for path in (*PAGES, "/ui/devices/cam-1", f"/ui/rollouts/{rollout.json()['id']}"):
        page = ctl.client.get(path)
        assert page.status_code == 200, (path, page.text)
        assert "vera (viewer)" in page.text
        # Works with no internet: every script, style and link is the controller's own.
        external = re.findall(r'(?:src|href)="((?:https?:)?//[^"]*)"', page.text)
        assert external == [], (path, external)
        assert 'href="/ui/audit"' not in page.text, path
    assert 'id="new-rollout"' not in ctl.client.get("/ui/rollouts").text
    refused = ctl.client.get("/ui/audit")
    assert refused.status_code == 403 and "this needs operator" in refused.json()["detail"]

    for asset in ("/ui/static/console.js", "/ui/static/console.css", "/ui/static/vendor/chart.umd.min.js"):
        assert ctl.client.get(asset).status_code == 200, asset
    chart = ctl.client.get("/ui/static/vendor/chart.umd.min.js").text
    assert chart.startswith("/*!\n * Chart.js v4.") and len(chart) > 100_000

    calibration = tmp_path / "calibration.npz"
    np.savez(calibration, X=np.random.default_rng(0).uniform(0, 16, (64, 64)).astype(np.float32))
    with digits_model.open("rb") as model, calibration.open("rb") as cal:
        form = {
            "version": "2",
            "parent_version": "1",
            "code_version": "git:abc123",
            "metrics": '{"accuracy": 0.97}',
        }
        files = {"file": ("digits.onnx", model), "calibration": ("calibration.npz", cal)}
        assert ctl.api("POST", "/v1/models/digits/versions", data=form, files=files).status_code == 201
    wait_until(lambda: _variants_settled(ctl, "digits", "2"), 60, "the int8 variants validated")
    models = ctl.client.get("/ui/models").text
    assert models.index('data-version="2"') < models.index('data-version="1"')
    assert "uploaded, no parent" in models
    assert "from version 1" in models and "code git:abc123" in models and "accuracy 0.97" in models
    assert "the reference the other variants are checked against" in models
    int8 = models.split('data-variant="onnx-int8', 1)[1].split("</tr>")[0]
    assert re.search(
        r"top-1 agreement \d+\.\d\d%, gate 99\.00%, max \|deviation\| [\d.e-]+, 64 samples", int8
    ), int8


def test_device_list_filters_by_search_tag_profile_and_status(ctl: Ctl) -> None:
    _profile(ctl, "coral-dev-board.toml")
    _profile(ctl, "raspberry-pi-4-4gb.toml")
    cam = ctl.api(
        "POST", "/v1/devices", json={"device_id": "cam-1", "tags": ["site-a"], "profile": "coral-dev-board"}
    )
    ctl.api(
        "POST", "/v1/devices", json={"device_id": "cam-2", "tags": ["site-b"], "profile": "coral-dev-board"}
    )
    ctl.api(
        "POST",
        "/v1/devices",
        json={"device_id": "mic-1", "tags": ["site-a"], "profile": "raspberry-pi-4-4gb"},
    )
    _online(ctl, cam.json())
    _login(ctl, ctl.token)

    def shown(**params: str) -> list[str]:
        page = ctl.client.get("/ui/devices", params=params)
        assert page.status_code == 200
        return _rows(page.text, "devices")

    assert shown() == ["cam-1", "cam-2", "mic-1"]
    assert shown(q="cam") == ["cam-1", "cam-2"]
    assert shown(q="SITE-B") == ["cam-2"]
    assert shown(tag="site-a") == ["cam-1", "mic-1"]
    assert shown(profile="raspberry-pi-4-4gb") == ["mic-1"]
    assert shown(status="online") == ["cam-1"]
    assert shown(status="offline") == ["cam-2", "mic-1"]
    assert shown(tag="site-a", status="offline") == ["mic-1"]
    groups = [
        {"name": "pilot", "devices": ["cam-2", "mic-1"]},
        {"name": "site-a", "query": {"tags": ["site-a"]}},
        {"name": "empty", "devices": []},
    ]
    for group in groups:
        created = ctl.api("POST", "/v1/groups", json=group)
        assert created.status_code == 201, created.text
    assert shown(group="pilot") == ["cam-2", "mic-1"]
    assert shown(group="site-a") == ["cam-1", "mic-1"]
    assert shown(group="pilot", tag="site-a") == ["mic-1"]
    assert shown(group="empty") == [] and shown(group="gone") == []
    assert "No device matches." in ctl.client.get("/ui/devices", params={"q": "nothing"}).text
    assert "1 of 3" in ctl.client.get("/ui/devices", params={"profile": "raspberry-pi-4-4gb"}).text

    overview = ctl.client.get("/ui").text
    counts = dict(re.findall(r'data-status="(\w+)"><strong>(\d+)</strong>', overview))
    assert counts == {"online": "1", "offline": "2", "updating": "0", "failed": "0", "all": "3"}
    assert "device cam-1: disk_full: /var/lib/edgefleet has 0 bytes free" in overview
    device = ctl.client.get("/ui/devices/cam-1").text
    assert "disk_full" in device and "(3 times)" in device and 'id="device-status">online<' in device
    assert (
        'href="/ui/devices?group=site-a"' in device
        and "no window: rollouts may update it at any time" in device
    )

    window = {"group": "pilot", "cron": "0 3 * * *", "duration_s": 1, "timezone": "Europe/Paris"}
    assert ctl.api("POST", "/v1/maintenance-windows", json=window).status_code == 201
    windows = ctl.client.get("/ui/devices/cam-2").text.split('id="device-windows">')[1].split("</dd>")[0]
    maintenance = ctl.api("GET", "/v1/devices/cam-2/maintenance").json()
    assert not maintenance["open"] and maintenance["reason"] in windows
    assert (
        ">closed<" in windows
        and "<code>0 3 * * *</code>" in windows
        and "(Europe/Paris), from group pilot" in windows
    )
    assert f"next opens {maintenance['windows'][0]['next_open']}" in windows


def test_a_failed_device_is_counted_and_alerted_with_its_reason(ctl: Ctl) -> None:
    _online(ctl, ctl.register("cam-1"), phase=fleet_pb2.MODEL_PHASE_FAILED)
    _login(ctl, ctl.token)
    overview = ctl.client.get("/ui").text
    assert re.search(r'data-status="failed"><strong>1<', overview)
    assert "device cam-1 failed an update: corrupt artifact" in overview
    assert _rows(ctl.client.get("/ui/devices", params={"status": "failed"}).text, "devices") == ["cam-1"]


def test_rollout_page_shows_waves_gates_events_and_the_actions_its_state_allows(
    ctl: Ctl, digits_model: Path
) -> None:
    for device_id in ("cam-1", "cam-2", "cam-3"):
        ctl.register(device_id)
    assert ctl.upload(digits_model, "digits", "1").status_code == 201
    plan = {
        "model": "digits",
        "version": "1",
        "target": {"all": True},
        "waves": [{"count": 1, "soak_s": 30}, {"percent": 100, "soak_s": 0}],
        "gates": {"max_error_rate": 0.05, "max_latency_ratio": 1.5},
    }
    created = ctl.api("POST", "/v1/rollouts", json=plan)
    assert created.status_code == 201, created.text
    rollout_id = created.json()["id"]
    csrf = _login(ctl, _token(ctl, "otto", "operator"))

    def buttons() -> dict[str, bool]:
        page = ctl.client.get(f"/ui/rollouts/{rollout_id}").text
        found = re.findall(r'data-command="([\w-]+)" ?(disabled)?', page)
        return {command: not disabled for command, disabled in found}

    page = ctl.client.get(f"/ui/rollouts/{rollout_id}").text
    assert 'id="rollout-state">running<' in page
    assert re.search(r'data-wave="1"><td>1</td><td>1</td>.*?data-count="pending".*?<td>30 s</td>', page, re.S)
    assert re.search(r'data-wave="2"><td>2</td><td>2</td>.*?data-count="waiting"', page, re.S)
    assert "error rate at most 0.05" in page and "p95 latency at most 1.5x the previous version" in page
    assert "3 devices in waves of 1/2" in page and "set_desired" in page
    assert buttons() == {
        "pause": True,
        "resume": False,
        "approve": False,
        "abort": True,
        "rollback": True,
        "promote": True,
        "retry-failed": True,
    }

    paused = ctl.client.post(
        f"/v1/rollouts/{rollout_id}/pause",
        json={"reason": "from the console"},
        headers={"X-CSRF-Token": csrf},
    )
    assert paused.status_code == 200, paused.text
    assert buttons()["resume"] and not buttons()["pause"]
    nothing_failed = ctl.client.post(
        f"/v1/rollouts/{rollout_id}/retry-failed", headers={"X-CSRF-Token": csrf}
    )
    assert nothing_failed.status_code == 409 and "no failed device" in nothing_failed.json()["detail"]
    page = ctl.client.get(f"/ui/rollouts/{rollout_id}").text
    assert 'id="rollout-state">paused<' in page and "operator: from the console" in page
    # The refusal the page shows next to a button is the API's own.
    again = ctl.client.post(f"/v1/rollouts/{rollout_id}/pause", headers={"X-CSRF-Token": csrf})
    assert (
        again.status_code == 409
        and again.json()["detail"] == f"cannot pause rollout {rollout_id}: it is paused"
    )

    rollouts = ctl.client.get("/ui/rollouts").text
    assert f'data-rollout="{rollout_id}"' in rollouts and "0/3" in rollouts
    assert 'id="new-rollout"' in rollouts
    device = ctl.client.get("/ui/devices/cam-1").text
    assert f'href="/ui/rollouts/{rollout_id}"' in device


def test_unknown_device_or_rollout_is_a_console_page_with_the_apis_reason(ctl: Ctl) -> None:
    _login(ctl, ctl.token)
    device = ctl.client.get("/ui/devices/nope")
    assert device.status_code == 404 and "text/html" in device.headers["content-type"]
    assert ctl.api("GET", "/v1/devices/nope").json()["detail"] in device.text
    rollout = ctl.client.get("/ui/rollouts/nope")
    assert rollout.status_code == 404 and "unknown rollout nope" in rollout.text


def test_a_session_ends_when_its_token_expires_or_on_logout(ctl: Ctl) -> None:
    short = _token(ctl, "temp", "operator", expires_in_s=60)
    _login(ctl, short)
    assert ctl.client.get("/ui/devices").status_code == 200
    accounts = ctl.controller.accounts
    real_clock = accounts.clock
    accounts.clock = lambda: real_clock() + 61
    try:
        ended = ctl.client.get("/ui/devices", follow_redirects=False)
        assert ended.status_code == 303 and ended.headers["location"] == "/ui/login?next=/ui/devices"
        assert ctl.client.get("/v1/devices").status_code == 401
    finally:
        accounts.clock = real_clock

    csrf = _login(ctl, ctl.token)
    assert ctl.client.post("/ui/logout").status_code == 403
    out = ctl.client.post("/ui/logout", headers={"X-CSRF-Token": csrf})
    assert out.status_code == 204 and 'edgefleet_session=""' in out.headers["set-cookie"]
    assert ctl.client.get("/ui", follow_redirects=False).status_code == 303


def test_a_login_posted_from_another_site_is_refused(ctl: Ctl) -> None:
    # A page elsewhere could otherwise log a victim's browser into the attacker's account.
    forged = ctl.client.post(
        "/ui/login",
        data={"token": ctl.token},
        headers={"Origin": "https://evil.example"},
        follow_redirects=False,
    )
    assert forged.status_code == 403 and "set-cookie" not in forged.headers
    assert "a login from another site is refused" in forged.text
    same = ctl.client.post(
        "/ui/login",
        data={"token": ctl.token},
        headers={"Origin": "http://testserver"},
        follow_redirects=False,
    )
    assert same.status_code == 303 and "edgefleet_session=" in same.headers["set-cookie"]
