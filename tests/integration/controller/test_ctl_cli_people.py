"""The operator CLI as people use it: tables, local times, help for everything, a quiet
broken pipe, errors that say what to do, and `rollouts watch` following a real rollout."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from controller.cli import build_parser
from tests.broker import Broker
from tests.localfleet import Agent, Controller, register_agent, wait_until
from tests.models import digits_classifier

EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")


def run(
    controller: Controller | None, *args: str, token: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
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


def _walk(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.Action]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helped = {a.dest for a in action._choices_actions}
            for name, sub in action.choices.items():
                assert name in helped, (
                    f"`{path} {name}` has no help line, so `{path} --help` does not list it"
                )
                yield from _walk(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield path, action


def test_every_command_and_option_has_help() -> None:
    missing = [
        f"{path} {a.option_strings or a.dest}" for path, a in _walk(build_parser(), "edgefleet") if not a.help
    ]
    assert missing == []
    rollouts = run(None, "rollouts", "--help").stdout
    assert all(f"    {c} " in rollouts for c in ("list", "show", "watch", "create", "events"))
    assert "    list " in run(None, "models", "--help").stdout


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
    agent: Agent = register_agent(controller, tmp_path / "agents", "cam-1").start()
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
