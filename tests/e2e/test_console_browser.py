"""The web console in a real headless Chromium, against a real controller, Mosquitto and
three agent processes: log in, watch rollouts run and steer them, read drift, be refused
as a viewer and sent back to the login page when the token is revoked. Every view is saved
as a screenshot (the folder is printed), at a tablet's width and some at a laptop's."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from playwright.sync_api import Browser, Dialog, Page, expect

from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker
from tests.support.browser import LAPTOP, TABLET, Screenshots, chromium, fits_width, screenshot_folder
from tests.support.localfleet import Controller, register_agent
from tests.support.models import digits_classifier
from tests.support.waiting import wait_until

DEVICES = ("cam-0", "cam-1", "cam-2")
THRESHOLD = 0.2
# Generous: two cores are shared with other test runs.
SLOW_MS = 120_000
ACTION_MS = 30_000


def _accept(dialog: Dialog) -> None:
    dialog.accept()


def _login(browser: Browser, url: str, token: str) -> Page:
    page = browser.new_page(viewport=TABLET)
    page.on("dialog", _accept)
    page.goto(f"{url}/ui/rollouts")
    expect(page).to_have_url(re.compile(r"/ui/login\?next=/ui/rollouts$"))
    page.fill("#token", token)
    page.click("button[type=submit]")
    expect(page).to_have_url(f"{url}/ui/rollouts")
    return page


def _submit_rollout(page: Page, version: str, waves: str, soak_s: float, max_error_rate: str = "") -> None:
    panel = page.locator("#new-rollout-panel")
    if panel.get_attribute("open") is None:
        page.click("#new-rollout-panel summary")
    form = page.locator("#new-rollout")
    form.locator("select[name=model]").select_option("digits")
    form.locator("input[name=version]").fill(version)
    form.locator("input[name=waves]").fill(waves)
    form.locator("input[name=soak]").fill(str(soak_s))
    form.locator("input[name=max_error_rate]").fill(max_error_rate)
    form.locator("button[type=submit]").click()


def _start_rollout(page: Page, version: str, waves: str, soak_s: float, max_error_rate: str = "") -> str:
    _submit_rollout(page, version, waves, soak_s, max_error_rate)
    page.wait_for_url(re.compile(r"/ui/rollouts/[^/]+$"))
    return page.url.rsplit("/", 1)[1]


def _command(page: Page, label: str) -> None:
    page.locator("#rollout-actions button", has_text=label).click()


def _infer_with_drift(agents: list[AgentProcess], samples: np.ndarray[Any, Any], seconds: float) -> None:
    """Inference on every device for ``seconds``, the second half on inverted digits (16 - x)."""
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        batch = samples[(i * 16) % 256 : (i * 16) % 256 + 16]
        if time.monotonic() > end - seconds / 2:
            batch = (16.0 - batch).astype(np.float32)
        for agent in agents:
            agent.infer({"X": batch})
        i += 1
        time.sleep(0.2)


def _fleet_windows(controller: Controller) -> int:
    body = controller.api("GET", "/v1/models/digits/versions/1/drift").json()
    return sum(1 for w in body["fleet"] if w["samples"] > 0)


def _shoot(shots: Screenshots, page: Page, name: str) -> None:
    assert fits_width(page), f"{name} scrolls sideways at {page.viewport_size}"
    shots.take(page, name)


@pytest.mark.slow
def test_console_runs_and_steers_rollouts_shows_drift_and_refuses_a_viewer(
    broker: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    controller = Controller(
        tmp_path / "controller",
        broker.port,
        passwd_file=broker.passwd_file,
        reload_command=broker.reload_command,
    )
    controller.init()
    settings = controller.data_dir / "controller.toml"
    settings.write_text(settings.read_text().replace("rollup_window_s = 60", "rollup_window_s = 2"))
    shots = Screenshots(screenshot_folder("console"))
    with capsys.disabled():
        print(f"\nconsole screenshots: {shots.folder}")
    agents: list[AgentProcess] = []
    try:
        controller.start()
        v1 = digits_classifier(tmp_path / "digits-1.onnx")
        v2 = digits_classifier(tmp_path / "digits-2.onnx", seed=1)
        for version, model in (("1", v1), ("2", v2)):
            with model.path.open("rb") as f:
                r = controller.api("POST", "/v1/models/digits/versions", data={"version": version},
                                   files={"file": (model.path.name, f)})  # fmt: skip
            assert r.status_code == 201, r.text
        reference = {"reference": {"inputs": v1.samples[:200].tolist()}}
        assert controller.api("PUT", "/v1/models/digits/versions/1/drift/baseline", json=reference).is_success
        policy = {
            "model": "digits",
            "conditions": {"drift": {"threshold": THRESHOLD, "windows": 2}},
            "trigger": {"kind": "webhook", "url": "http://127.0.0.1:9/retrain", "secret": "s" * 16},
            "enabled": False,
        }
        assert controller.api("PUT", "/v1/retraining/policies/digits-drift", json=policy).is_success
        viewer = controller.api("POST", "/v1/tokens", json={"name": "vera", "role": "viewer"}).json()
        for device_id in DEVICES:
            agents.append(register_agent(controller, tmp_path / "agents", device_id).start())

        with chromium() as browser:
            stranger = browser.new_page(viewport=TABLET)
            stranger.goto(f"{controller.url}/ui/login")
            stranger.fill("#token", "not-a-token")
            stranger.click("button[type=submit]")
            expect(stranger.locator(".login [role=alert]")).to_have_text("unknown, expired or revoked token")
            _shoot(shots, stranger, "login-refused")
            stranger.close()

            page = _login(browser, controller.url, controller.token)
            expect(page.locator("#whoami")).to_have_text("admin (admin)")

            # The overview is opened once: its counts change in place as the agents connect.
            page.goto(f"{controller.url}/ui")
            page.evaluate("window.stillTheSamePage = true")
            expect(page.locator('[data-status="online"] strong')).to_have_text("3", timeout=SLOW_MS)
            assert page.evaluate("window.stillTheSamePage") is True
            _shoot(shots, page, "overview")

            page.goto(f"{controller.url}/ui/devices")
            page.fill("input[name=q]", "cam-1")
            page.click("form.filters button")
            expect(page.locator("#devices tbody tr")).to_have_count(1)
            expect(page.locator("#devices")).to_contain_text("cam-1")
            page.goto(f"{controller.url}/ui/devices?status=online")
            expect(page.locator("#devices tbody tr")).to_have_count(3)
            _shoot(shots, page, "devices")

            page.goto(f"{controller.url}/ui/rollouts")
            # The API's refusal, next to the form that caused it; nothing is started.
            _submit_rollout(page, "9", "1, 2", 1)
            refusal = page.locator("#new-rollout [data-error]")
            expect(refusal).to_contain_text(re.compile(r"^4\d\d: .*\b9\b"))
            expect(page).to_have_url(f"{controller.url}/ui/rollouts")
            _shoot(shots, page, "rollout-form-refused")

            first = _start_rollout(page, "1", "1, 2", 1)
            # The page is not reloaded: a marker set now survives until the rollout ends.
            page.evaluate("window.stillTheSamePage = true")
            expect(page.locator("#rollout-state")).to_have_text("succeeded", timeout=SLOW_MS)
            assert page.evaluate("window.stillTheSamePage") is True
            expect(page.locator("table.waves tbody tr")).to_have_count(2)
            expect(page.locator('table.waves [data-count="active"]')).to_have_text(["active 1", "active 2"])
            expect(page.locator("ul.gates")).to_contain_text("devices failing to update at most 0%")
            expect(page.locator("table.events")).to_contain_text(
                "wave 1 of 2 passed its gates (0 of 1 devices failed)"
            )
            expect(page.locator('#rollout-actions button[data-command="pause"]')).to_be_disabled()
            _shoot(shots, page, "rollout-succeeded")
            page.set_viewport_size(LAPTOP)
            _shoot(shots, page, "rollout-succeeded-laptop")
            page.set_viewport_size(TABLET)

            _infer_with_drift(agents, v1.samples, 8)
            wait_until(lambda: _fleet_windows(controller) >= 3, 60, "three fleet-wide drift windows")
            page.goto(f"{controller.url}/ui/drift?model=digits&version=1")
            expect(page.locator("#drift")).to_have_attribute("data-windows", re.compile(r"^([3-9]|\d\d+)$"))
            expect(page.locator("#drift figcaption").first).to_contain_text(f"psi > {THRESHOLD}")
            page.wait_for_function(
                "() => Chart.getChart('chart-drift').data.datasets.some((d) => d.label === 'threshold digits-drift')"
            )
            _shoot(shots, page, "drift")
            page.set_viewport_size(LAPTOP)
            _shoot(shots, page, "drift-laptop")
            page.set_viewport_size(TABLET)

            page.goto(f"{controller.url}/ui/devices/{DEVICES[0]}")
            expect(page.locator("#device-status")).to_have_text("online")
            expect(page.locator("#installed")).to_contain_text("digits")
            expect(page.locator("#device-rollouts")).to_contain_text(first[:12])
            page.wait_for_function("() => Chart.getChart('chart-cpu')?.data.labels.length > 0")
            page.wait_for_function("() => Chart.getChart('chart-latency')?.data.labels.length > 0")
            _shoot(shots, page, "device")

            page.goto(f"{controller.url}/ui/rollouts")
            second = _start_rollout(page, "2", "1, 1, 1", 600, max_error_rate="0.5")
            expect(page.locator("#rollout-state")).to_have_text("running")
            expect(page.locator("ul.gates")).to_contain_text("error rate at most 0.5")
            _command(page, "Pause")
            expect(page.locator("#rollout-state")).to_have_text("paused", timeout=ACTION_MS)
            expect(page.locator('#rollout-actions button[data-command="resume"]')).to_be_enabled()
            _shoot(shots, page, "rollout-paused")
            _command(page, "Resume")
            expect(page.locator("#rollout-state")).to_have_text("running", timeout=ACTION_MS)

            viewer_page = _login(browser, controller.url, viewer["token"])
            expect(viewer_page.locator("#new-rollout")).to_have_count(0)
            viewer_page.goto(f"{controller.url}/ui/rollouts/{second}")
            _command(viewer_page, "Pause")
            refused = viewer_page.locator("#rollout-actions-error")
            expect(refused).to_contain_text("403")
            expect(refused).to_contain_text("role viewer")
            _shoot(shots, viewer_page, "viewer-refused")
            assert controller.api("GET", f"/v1/rollouts/{second}").json()["state"] == "running"
            # Revoking the token ends the session: the open page's next refresh goes to the login.
            assert controller.api("DELETE", f"/v1/tokens/{viewer['id']}").is_success
            expect(viewer_page).to_have_url(
                re.compile(rf"/ui/login\?next=/ui/rollouts/{second}$"), timeout=ACTION_MS
            )

            _command(page, "Roll back")
            expect(page.locator("#rollout-state")).to_have_text("rolled_back", timeout=SLOW_MS)
            _shoot(shots, page, "rollout-rolled-back")

            page.goto(f"{controller.url}/ui/rollouts")
            expect(page.locator(f'tr[data-rollout="{first}"]')).to_contain_text("succeeded")
            expect(page.locator(f'tr[data-rollout="{second}"]')).to_contain_text("rolled_back")
            _shoot(shots, page, "rollouts")
            page.goto(f"{controller.url}/ui/models")
            expect(page.locator('[data-model="digits"] details.version')).to_have_count(2)
            _shoot(shots, page, "models")
            page.goto(f"{controller.url}/ui/datasets")
            expect(page.locator("main")).to_contain_text("digits-drift")
            _shoot(shots, page, "datasets")
            page.goto(f"{controller.url}/ui/audit")
            audit = page.locator("#audit")
            for route in ("/v1/rollouts", f"rollout_id={second}", "/ui/login", "/v1/tokens/{token_id}"):
                expect(audit).to_contain_text(route)
            refusal_row = audit.locator("tr", has_text="vera").filter(has_text="/pause")
            expect(refusal_row).to_contain_text("console")
            expect(refusal_row).to_contain_text("403")
            _shoot(shots, page, "audit")
            page.set_viewport_size(LAPTOP)
            page.goto(f"{controller.url}/ui")
            _shoot(shots, page, "overview-laptop")
        assert len(shots.taken) == 17 and all(p.stat().st_size > 10_000 for p in shots.taken)
    finally:
        for agent in agents:
            agent.stop()
        controller.stop()
