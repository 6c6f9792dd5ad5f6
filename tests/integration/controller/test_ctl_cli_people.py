"""The operator CLI as people use it: tables, local times, a quiet broken pipe, errors that
say what to do, and `rollouts watch` following a real rollout (help: test_ctl_cli_help.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker, free_port
from tests.support.localfleet import Controller, register_agent
from tests.support.models import digits_classifier
from tests.support.waiting import wait_until

EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")


def run(
    controller: Controller | None, *args: str, token: str | None = None, tz: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    if tz is not None:
        env["TZ"] = tz
    if controller is not None:
        env |= {
            "EDGEFLEET_URL": controller.url,
            "EDGEFLEET_TOKEN": controller.token if token is None else token,
        }
    env["COLUMNS"] = "200"
    return subprocess.run([EDGEFLEET, *args], capture_output=True, text=True, env=env, timeout=300)


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


def test_missing_token_says_how_to_set_it() -> None:
    done = run(None, "devices", "list")
    assert done.returncode == 1 and done.stdout == "" and "Traceback" not in done.stderr
    assert "EDGEFLEET_TOKEN" in done.stderr and "EDGEFLEET_URL" in done.stderr


def test_tables_for_people_json_for_scripts(controller: Controller, tmp_path: Path) -> None:
    digits = digits_classifier(tmp_path / "digits.onnx")
    calibration = tmp_path / "calibration.npz"
    import numpy as np

    np.savez(calibration, X=digits.samples[:32])
    # The upload waits for its variants: the answer shows them finished, not pending.
    uploaded = run(
        controller, "--json", "models", "upload", str(digits.path), "--name", "digits", "--version", "1",
        "--calibration", str(calibration),
    )  # fmt: skip
    assert uploaded.returncode == 0, uploaded.stderr
    variants = json.loads(uploaded.stdout)["variants"]
    assert variants and all(v["status"] in ("ready", "rejected", "failed") for v in variants)
    assert controller.cli("devices", "register", "cam-1", "--tag", "lobby")["device_id"] == "cam-1"

    listed = run(controller, "devices", "list")
    assert listed.returncode == 0, listed.stderr
    assert "device_id" in listed.stdout.replace(" ", "_") or "device id" in listed.stdout
    assert "cam-1" in listed.stdout and "lobby" in listed.stdout and "{" not in listed.stdout
    shown = run(controller, "models", "show", "digits", "1")
    assert shown.returncode == 0 and "onnx-int8-static" in shown.stdout
    created = json.loads(run(controller, "--json", "models", "list").stdout)[0]["versions"][0]["created_at"]
    local = datetime.fromtimestamp(created).astimezone().isoformat(timespec="seconds")
    assert local in run(controller, "models", "list").stdout, "timestamps are ISO 8601 in local time"
    # --json after the command too, and the same data as the API.
    assert (
        json.loads(run(controller, "devices", "list", "--json").stdout)
        == controller.api("GET", "/v1/devices").json()
    )


# Epoch seconds (2020-2033) or milliseconds standing alone: what people should never have to read.
EPOCH = re.compile(r"(?<![\w.])1[6-9]\d{8}(?:\d{3}|\.\d+)?(?![\w.])")


def test_times_are_iso_8601_in_the_local_zone_everywhere(controller: Controller, tmp_path: Path) -> None:
    digits = digits_classifier(tmp_path / "digits.onnx")
    controller.cli("models", "upload", str(digits.path), "--name", "digits", "--version", "1", "--no-wait")
    controller.cli("devices", "register", "cam-1")
    rollout = controller.cli("rollouts", "create", "--model", "digits", "--version", "1", "--device", "cam-1")
    controller.cli("tokens", "create", "--name", "vera", "--role", "viewer", "--expires-in-days", "1")
    # A zone five and a half hours east of UTC (POSIX TZ syntax, no tz database needed).
    local = "IST-05:30"
    for command in (
        ["models", "list"],
        ["models", "show", "digits", "1"],
        ["devices", "list"],
        ["rollouts", "list"],
        ["rollouts", "show", rollout["id"]],
        ["rollouts", "events", rollout["id"]],
        ["tokens", "list"],
        ["audit"],
        ["events", "cam-1"],
    ):
        done = run(controller, *command, tz=local)
        assert done.returncode == 0, (command, done.stderr)
        assert EPOCH.search(done.stdout) is None, (command, done.stdout)
        if command[0] not in ("events", "devices"):  # cam-1 never connected: no times to show
            assert "+05:30" in done.stdout, (command, done.stdout)


def test_status_says_whether_the_controller_answers_and_takes_the_token(
    controller: Controller, tmp_path: Path
) -> None:
    shown = json.loads(run(controller, "--json", "status", "--wait", "30").stdout)
    assert (shown["controller"], shown["token"], shown["role"], shown["devices"]) == (
        controller.url, "admin", "admin", 0,
    )  # fmt: skip
    assert shown["broker_connected"] and shown["broker"] == f"127.0.0.1:{controller.broker_port}"
    # A controller whose broker is not running answers HTTP all the same: status says so.
    lonely = Controller(tmp_path / "lonely", free_port()).start()
    try:
        alone = run(lonely, "status", "--wait", "1")
    finally:
        lonely.stop()
    assert alone.returncode == 1 and "cannot reach its broker at 127.0.0.1:" in alone.stderr
    refused = run(controller, "status", token="not-a-token")
    assert refused.returncode == 1 and "401" in refused.stderr and "EDGEFLEET_TOKEN" in refused.stderr
    viewer = controller.cli("tokens", "create", "--name", "vera", "--role", "viewer")["token"]
    assert json.loads(run(controller, "--json", "status", token=viewer).stdout)["role"] == "viewer"
    denied = run(controller, "devices", "register", "cam-9", token=viewer)
    assert denied.returncode == 1 and "403: token 'vera' has role viewer" in denied.stderr
    assert "edgefleet tokens create" in denied.stderr
    env = {**os.environ, "EDGEFLEET_URL": f"http://127.0.0.1:{free_port()}", "EDGEFLEET_TOKEN": "t"}
    started = time.monotonic()
    nobody = subprocess.run([EDGEFLEET, "status", "--wait", "2"], capture_output=True, text=True, env=env)
    assert nobody.returncode == 1 and "cannot reach the controller" in nobody.stderr
    assert time.monotonic() - started >= 2, "--wait waits for a controller that is not there yet"
    # The agent's telemetry interval goes into the config registration writes.
    config = tmp_path / "cam-1.toml"
    controller.cli("devices", "register", "cam-1", "--agent-config", str(config), "--telemetry-interval", "2")
    assert tomllib.loads(config.read_text())["telemetry_interval_s"] == 2.0


def test_broken_pipe_ends_quietly(controller: Controller) -> None:
    controller.cli("devices", "register", "cam-1")
    env = {**os.environ, "EDGEFLEET_URL": controller.url, "EDGEFLEET_TOKEN": controller.token}
    for mode in ([], ["--json"]):
        proc = subprocess.Popen(
            [EDGEFLEET, *mode, "devices", "list"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # the reader is gone before anything is written (`| head` that already quit)
        err = proc.stderr.read().decode()
        proc.wait(timeout=60)
        assert err == "" and proc.returncode == 1, (mode, err)


@pytest.mark.slow
def test_rollouts_watch_follows_a_rollout_to_its_end(controller: Controller, tmp_path: Path) -> None:
    digits = digits_classifier(tmp_path / "digits.onnx")
    controller.cli("models", "upload", str(digits.path), "--name", "digits", "--version", "1", "--no-wait")
    agent: AgentProcess = register_agent(controller, tmp_path / "agents", "cam-1").start()
    try:
        wait_until(lambda: controller.cli("devices", "list")[0]["online"], 60, "the agent online")
        rollout = controller.cli(
            "rollouts", "create", "--model", "digits", "--version", "1", "--device", "cam-1"
        )
        watched = run(controller, "rollouts", "watch", rollout["id"], "--interval", "0.3")
        assert watched.returncode == 0, watched.stdout + watched.stderr
        assert "succeeded" in watched.stdout and "cam-1" in watched.stdout and "waves" in watched.stdout
    finally:
        agent.stop()
    # A rollout aborted while it is watched: the watch ends with it, exit 1.
    controller.cli("devices", "register", "cam-2")
    soaking = controller.cli(
        "rollouts", "create", "--model", "digits", "--version", "1", "--device", "cam-2", "--wave", "1:600",
    )  # fmt: skip
    env = {**os.environ, "EDGEFLEET_URL": controller.url, "EDGEFLEET_TOKEN": controller.token}
    watch = subprocess.Popen(
        [EDGEFLEET, "--json", "rollouts", "watch", soaking["id"], "--interval", "0.3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            watch.wait(timeout=2)  # still following: the rollout has not ended
        controller.cli("rollouts", "abort", soaking["id"], "--reason", "test")
        out, err = watch.communicate(timeout=60)
    finally:
        watch.kill()
    assert watch.returncode == 1, err
    final = json.loads(out)
    assert final["id"] == soaking["id"] and final["state"] == "aborted"


def test_a_rollout_that_skips_devices_says_so_on_stderr(controller: Controller, tmp_path: Path) -> None:
    digits = digits_classifier(tmp_path / "digits.onnx")
    controller.cli("models", "upload", str(digits.path), "--name", "digits", "--version", "1", "--no-wait")
    for device_id in ("cam-1", "cam-2"):
        controller.cli("devices", "register", device_id)
    # cam-1 gets the version in tenant door (its desired state names it); cam-2 has nothing there.
    plain = controller.cli(
        "rollouts", "create", "--model", "digits", "--version", "1", "--tenant", "door", "--device", "cam-1"
    )
    controller.cli("rollouts", "abort", plain["id"])
    shadowed = run(
        controller, "rollouts", "create", "--model", "digits", "--version", "1", "--tenant", "door", "--all",
        "--shadow-soak", "30", "--min-shadow-agreement", "0.9",
    )  # fmt: skip
    assert shadowed.returncode == 0, shadowed.stderr
    assert "warning: 1 of 2 targeted devices skipped" in shadowed.stderr
    assert "cam-2: no model is live in tenant door" in shadowed.stderr
