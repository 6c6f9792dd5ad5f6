"""Maintenance windows end to end: real mosquitto, the controller process with its rollout engine
on a clock the test moves (tests/support/engine_clock.py), real agent processes. A device outside its
group's window waits, says why, and is updated when the engine's clock says the window opened."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker
from tests.support.localfleet import Controller, register_agent, rollout_done
from tests.support.models import digits_classifier
from tests.support.waiting import wait_until

ENGINE_CLOCK = Path(__file__).resolve().parents[1] / "support" / "engine_clock.py"
# A zone with a UTC offset and no daylight-saving change, so the hour chosen always exists.
TOKYO = ZoneInfo("Asia/Tokyo")


@pytest.fixture
def offset_file(tmp_path: Path) -> Path:
    path = tmp_path / "engine-clock-offset"
    path.write_text("0")
    return path


@pytest.fixture
def shifted_controller(broker: Broker, tmp_path: Path, offset_file: Path) -> Iterator[Controller]:
    c = Controller(
        tmp_path / "controller",
        broker.port,
        passwd_file=broker.passwd_file,
        reload_command=broker.reload_command,
        serve=(sys.executable, str(ENGINE_CLOCK), str(offset_file)),
    )
    c.init()
    c.start()
    try:
        yield c
    finally:
        c.stop()


def reported_digests(controller: Controller, device_id: str) -> set[str]:
    device: dict[str, Any] = controller.api("GET", f"/v1/devices/{device_id}").json()
    return {m["artifact_digest"] for m in (device.get("reported") or {}).get("models", [])}


def by_device(rollout: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["device_id"]: d for d in rollout["devices"]}


@pytest.mark.slow
def test_a_device_outside_its_window_waits_then_updates_when_the_window_opens(
    shifted_controller: Controller, agents: list[AgentProcess], offset_file: Path, tmp_path: Path
) -> None:
    controller = shifted_controller
    digits = digits_classifier(tmp_path / "digits.onnx")
    version = controller.cli("models", "upload", str(digits.path), "--name", "digits", "--version", "1")
    for device_id in ("day-1", "night-1"):
        agents.append(register_agent(controller, tmp_path / "agents", device_id).start())
    wait_until(lambda: all(d["online"] for d in controller.cli("devices", "list")), 60, "both agents online")

    # A daily window in Tokyo that opens five to six hours from now and lasts half an hour: the
    # real clock is outside it for the whole test.
    opens = (datetime.now(TOKYO) + timedelta(hours=6)).replace(minute=0, second=0, microsecond=0)
    controller.cli("groups", "create", "night-shift", "--device", "night-1")
    window = controller.cli(
        "windows", "add", "--group", "night-shift", "--cron", f"0 {opens.hour} * * *",
        "--duration", "30m", "--timezone", "Asia/Tokyo",
    )  # fmt: skip
    next_open = opens.isoformat(timespec="minutes")
    assert (window["open"], window["next_open"]) == (False, next_open)

    rollout = controller.cli(
        "rollouts",
        "create",
        "--model",
        "digits",
        "--version",
        "1",
        "--device",
        "day-1",
        "--device",
        "night-1",
    )

    def day_active() -> dict[str, Any] | None:
        r: dict[str, Any] = controller.api("GET", f"/v1/rollouts/{rollout['id']}").json()
        return r if by_device(r)["day-1"]["status"] == "active" else None

    waiting = by_device(wait_until(day_active, 90, "day-1 updated"))["night-1"]
    assert (waiting["status"], waiting["detail"]) == (
        "waiting",
        f"waiting for maintenance window (next opens {next_open})",
    )
    assert version["digest"] not in reported_digests(controller, "night-1")
    assert controller.cli("windows", "status", "night-1")["open"] is False

    # The engine's clock reaches the window (five seconds into it); the real clock does not move.
    offset_file.write_text(str(opens.timestamp() + 5 - datetime.now(TOKYO).timestamp()))
    final = wait_until(lambda: rollout_done(controller, rollout["id"]), 90, "the rollout to finish")
    assert final["status"] == "succeeded", final
    assert {d["status"] for d in final["devices"]} == {"active"}
    assert version["digest"] in reported_digests(controller, "night-1")
    sent = [e for e in controller.cli("rollouts", "events", rollout["id"]) if e["kind"] == "set_desired"]
    assert [e["device_id"] for e in sent] == ["day-1", "night-1"]
