"""A controller restored from a backup of its data folder still reaches its devices: they have
applied desired-state generations newer than any the restored database remembers issuing, and an
agent ignores a generation it has seen. The controller learns from each device's reported state
which generation it has seen and issues the next ones above it. Real controller, mosquitto and
agent processes; the backup is a copy of the SQLite files taken while the controller was stopped."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker
from tests.support.localfleet import Controller, register_agent, rollout_done
from tests.support.model_bytes import linear_model
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow

DB_FILES = ("controller.db", "controller.db-wal", "controller.db-shm")


def copy_database(source: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name in DB_FILES:
        (target / name).unlink(missing_ok=True)
        if (source / name).exists():
            shutil.copy2(source / name, target / name)


def seen_generation(controller: Controller, device_id: str) -> int:
    reported: dict[str, Any] | None = controller.api("GET", f"/v1/devices/{device_id}").json()["reported"]
    return int(reported["desired_generation"]) if reported else 0


def test_a_controller_restored_from_an_old_backup_rolls_out_to_devices_that_saw_newer_generations(
    broker: Broker, controller: Controller, agents: list[AgentProcess], tmp_path: Path
) -> None:
    for version in ("1", "2", "3"):
        path = tmp_path / f"v{version}.onnx"
        path.write_bytes(linear_model(int(version), n_in=8, n_out=4))
        controller.cli("models", "upload", str(path), "--name", "lin", "--version", version)
    agent = register_agent(controller, tmp_path / "agents", "cam-0")
    agents.append(agent.start())
    wait_until(lambda: controller.api("GET", "/v1/devices/cam-0").json()["online"], 60, "cam-0 online")

    # The nightly backup, taken before any rollout.
    controller.stop()
    copy_database(controller.data_dir, tmp_path / "backup")
    controller.start()
    for version in ("1", "2"):
        rollout = controller.cli("rollouts", "create", "--model", "lin", "--version", version, "--all")
        done = wait_until(lambda r=rollout: rollout_done(controller, r["id"]), 120, f"version {version}")
        assert done["status"] == "succeeded", done
    assert seen_generation(controller, "cam-0") >= 2

    # The disk is lost; the backup comes back. It remembers issuing no generation at all.
    controller.stop()
    copy_database(tmp_path / "backup", controller.data_dir)
    controller.start()
    wait_until(lambda: seen_generation(controller, "cam-0") >= 2, 60, "cam-0's reported state read again")
    rollout = controller.cli("rollouts", "create", "--model", "lin", "--version", "3", "--all")
    done = wait_until(lambda: rollout_done(controller, rollout["id"]), 120, "version 3 after the restore")
    assert done["status"] == "succeeded", done
    assert agent.infer({"x": np.ones((1, 8), np.float32)}).model_version == "3"
    assert "device has seen a newer desired-state generation" in controller.log_file.read_text()
