"""`edgefleet groups|windows` and the rollout flags for groups, start times and retry-failed,
run as an operator would against a real controller process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from controller.cli_groups import parse_duration
from tests.support.broker import Broker
from tests.support.localfleet import Controller
from tests.support.models import digits_classifier

EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")


def run(controller: Controller, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env |= {"EDGEFLEET_URL": controller.url, "EDGEFLEET_TOKEN": controller.token, "COLUMNS": "200"}
    return subprocess.run([EDGEFLEET, *args], capture_output=True, text=True, env=env, timeout=120)


def as_json(controller: Controller, *args: str) -> Any:
    done = run(controller, "--json", *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def controller(broker: Broker, tmp_path: Path) -> Iterator[Controller]:
    c = Controller(
        tmp_path / "controller",
        broker.port,
        passwd_file=broker.passwd_file,
        reload_command=broker.reload_command,
    )
    try:
        yield c.start()
    finally:
        c.stop()


def test_durations() -> None:
    assert [parse_duration(t) for t in ("90", "90s", "30m", "2h", "1d", "1.5h")] == [
        90,
        90,
        1800,
        7200,
        86400,
        5400,
    ]


@pytest.mark.slow
def test_groups_and_windows_from_the_cli(controller: Controller) -> None:
    for device_id, tag in (("cam-1", "site-a"), ("cam-2", "site-a"), ("cam-3", "site-b")):
        as_json(controller, "devices", "register", device_id, "--tag", tag)
    created = as_json(controller, "groups", "create", "site-a", "--tag", "site-a", "--description", "Lyon")
    assert (created["kind"], created["devices"]) == ("dynamic", ["cam-1", "cam-2"])
    as_json(controller, "groups", "create", "pilot", "--device", "cam-3")
    assert as_json(controller, "groups", "add", "pilot", "cam-1")["devices"] == ["cam-1", "cam-3"]
    assert as_json(controller, "groups", "remove", "pilot", "cam-3")["devices"] == ["cam-1"]

    refused = run(controller, "groups", "create", "ghosts", "--device", "ghost")
    assert refused.returncode == 1 and "unknown devices: ghost" in refused.stderr
    bad_cron = run(controller, "windows", "add", "--group", "site-a", "--cron", "0 2 * *", "--duration", "2h")
    assert bad_cron.returncode == 1 and "five fields" in bad_cron.stderr
    bad_zone = run(
        controller, "windows", "add", "--group", "site-a", "--cron", "0 2 * * *", "--duration", "2h",
        "--timezone", "Mars/Base",
    )  # fmt: skip
    assert bad_zone.returncode == 1 and "unknown time zone 'Mars/Base'" in bad_zone.stderr

    window = as_json(
        controller, "windows", "add", "--group", "site-a", "--cron", "0 2 * * *", "--duration", "2h",
        "--timezone", "Europe/Paris",
    )  # fmt: skip
    assert (window["duration_s"], window["timezone"]) == (7200, "Europe/Paris")
    listed = run(controller, "groups", "list")
    assert listed.returncode == 0, listed.stderr
    assert (
        "site-a" in listed.stdout and "dynamic" in listed.stdout and "0 2 * * * Europe/Paris" in listed.stdout
    )
    shown = run(controller, "groups", "show", "site-a")
    assert "maintenance windows" in shown.stdout and window["id"] in shown.stdout and "cam-2" in shown.stdout
    status = as_json(controller, "windows", "status", "cam-1")
    assert status["windows"][0]["id"] == window["id"]
    table = run(controller, "windows", "status", "cam-3").stdout
    assert "open: a rollout may update it now" in table
    assert [w["id"] for w in as_json(controller, "windows", "list", "--group", "site-a")] == [window["id"]]
    assert as_json(controller, "windows", "remove", window["id"])["id"] == window["id"]
    assert as_json(controller, "groups", "delete", "pilot")["name"] == "pilot"
    assert [g["name"] for g in as_json(controller, "groups", "list")] == ["site-a"]


@pytest.mark.slow
def test_rollouts_to_a_group_at_a_start_time_and_retry_failed(controller: Controller, tmp_path: Path) -> None:
    model = digits_classifier(tmp_path / "digits.onnx").path
    as_json(controller, "models", "upload", str(model), "--name", "digits", "--version", "1")
    for device_id in ("cam-1", "cam-2"):
        as_json(controller, "devices", "register", device_id, "--tag", "lab")
    as_json(controller, "groups", "create", "lab", "--tag", "lab")
    missing = run(controller, "rollouts", "create", "--model", "digits", "--version", "1", "--group", "nope")
    assert missing.returncode == 1 and "unknown group nope" in missing.stderr
    bad_time = run(
        controller, "rollouts", "create", "--model", "digits", "--version", "1", "--group", "lab",
        "--start-at", "tomorrow",
    )  # fmt: skip
    assert bad_time.returncode == 1 and "--start-at 'tomorrow'" in bad_time.stderr
    rollout = as_json(
        controller, "rollouts", "create", "--model", "digits", "--version", "1", "--group", "lab",
        "--start-at", "2031-05-01T03:00:00",
    )  # fmt: skip
    local = datetime.fromisoformat("2031-05-01T03:00:00").astimezone()
    assert rollout["plan"]["start_at"] == local.timestamp()
    assert rollout["plan"]["target"]["group"] == "lab"
    assert [d["status"] for d in rollout["devices"]] == ["waiting", "waiting"]
    retry = run(controller, "rollouts", "retry-failed", rollout["id"])
    assert retry.returncode == 1 and "no failed device to retry" in retry.stderr
    assert "retry-failed" in run(controller, "rollouts", "--help").stdout
