"""The fleet simulator end to end: 200 simulated devices against a real controller and mosquitto.

Each simulated device is the agent's own session (tests/support/fleetsim) on its own
broker login: registered in one batch, it connects, reports telemetry that the
controller stores and acknowledges, and takes a three-wave rollout through the
agent's updater (signed desired state, checked chunks, staging inference).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.broker import Broker
from tests.support.fleetsim import DeviceLogin, SimFleet, SimSettings
from tests.support.localfleet import Controller
from tests.support.models import dense_of_size
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow

DEVICES = 200


def test_two_hundred_simulated_devices_register_report_and_converge_on_a_rollout(
    broker: Broker, controller: Controller, tmp_path: Path
) -> None:
    registered = controller.api(
        "POST", "/v1/device-batches", json={"devices": [{"device_id": f"sim-{i:03}"} for i in range(DEVICES)]}
    )
    assert registered.status_code == 201, registered.text
    creds = registered.json()
    key = creds[0]["controller_public_key"]
    assert key, "the devices verify what the controller signs"
    logins = [DeviceLogin(c["device_id"], c["mqtt_password"]) for c in creds]
    settings = SimSettings("127.0.0.1", broker.port, key, tmp_path / "sim", telemetry_interval_s=1.0)
    fleet = SimFleet(logins, settings, processes=2, log_dir=tmp_path / "logs").start()
    try:
        fleet.wait_connected(60)
        wait_until(
            lambda: sum(d["online"] for d in controller.api("GET", "/v1/devices").json()) == DEVICES,
            60,
            "every simulated device online at the controller",
        )
        # Stored, acknowledged, and so gone from each device's outbox.
        fleet.wait(lambda s: s.acknowledged >= 2 * DEVICES, 60, "two windows per device acknowledged")
        stored = controller.api("GET", "/v1/devices/sim-007/telemetry?limit=5").json()
        assert stored and all(w["system"]["mem_total_bytes"] > 0 for w in stored)

        version = controller.cli(
            "models",
            "upload",
            str(dense_of_size(tmp_path / "m.onnx", 0.5)),
            "--name",
            "dense",
            "--version",
            "1",
        )
        rollout = controller.cli(
            "rollouts", "create", "--model", "dense", "--version", "1", "--all",
            "--wave", "10%:1", "--wave", "40%:1", "--wave", "100%:1",
        )  # fmt: skip
        final = wait_until(
            lambda: (
                (r := controller.api("GET", f"/v1/rollouts/{rollout['id']}").json())["state"] != "running"
                and r
            ),
            180,
            "the rollout to end",
            interval=0.5,
        )
        assert final["state"] == "succeeded", final
        stats = fleet.wait_active(version["digest"], 30)
        assert stats.failed == {}
        assert stats.chunk_bytes >= DEVICES * Path(tmp_path / "m.onnx").stat().st_size
        device = controller.api("GET", "/v1/devices/sim-123").json()
        [model] = device["reported"]["models"]
        assert (model["artifact_digest"], model["phase"]) == (version["digest"], "active")
        kinds = {e["kind"] for e in controller.api("GET", "/v1/devices/sim-123/events").json()}
        assert {"download_started", "model_activated", "update_outcome"} <= kinds
    finally:
        last = fleet.stop()
    assert last is not None and last.connected == 0
