"""Rollout plans, commands and the event log through the REST API and the CLI, over real mosquitto."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support.broker import Broker
from tests.support.controller_process import Ctl
from tests.support.localfleet import Controller

# The API and its storage on both databases (tests/conftest.py's store_url, through the ctl fixture).
pytestmark = pytest.mark.both_backends

STAGED: dict[str, Any] = {
    "model": "digits",
    "version": "1",
    "target": {"tags": ["lab"]},
    "waves": [{"count": 1, "soak_s": 60}, {"percent": 100}],
    "gates": {"max_error_rate": 0.05},
    "failure_action": "rollback",
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"waves": [{"count": 1, "percent": 5}]}, "wave 1: give either a device count or a percentage"),
        ({"gates": {"max_error_rate": 3}}, "gates.max_error_rate must be between 0 and 1"),
        ({"target": {"tags": ["nowhere"]}}, "the target matches no registered device: tags nowhere"),
        ({"target": {"devices": ["ghost"]}}, "unknown devices: ghost"),
        ({"target": {}}, "a rollout needs at least one device"),
        ({"failure_action": "explode"}, "failure_action"),
        ({"shadow": {"soak_s": 30, "min_agreement": 1.5}}, "shadow.min_agreement must be between 0 and 1"),
        ({"shadow": {"min_agreement": 0.9}}, "soak_s"),
        ({"shadow": {"soak_s": 30}, "tenant": "app.shadow"}, "is itself a shadow slot"),
    ],
)
def test_bad_plans_are_refused_naming_the_problem(
    ctl: Ctl, digits_model: Path, change: dict[str, Any], message: str
) -> None:
    ctl.upload(digits_model, "digits", "1")
    ctl.register("cam-1", ["lab"])
    response = ctl.api("POST", "/v1/rollouts", json={**STAGED, **change})
    assert response.status_code == 422, response.text
    assert message in response.text
    assert ctl.api("GET", "/v1/rollouts").json() == []


def test_staged_plan_waves_conflicts_commands_and_event_log(ctl: Ctl, digits_model: Path) -> None:
    ctl.upload(digits_model, "digits", "1")
    for device_id in ("cam-1", "cam-2", "cam-3"):
        ctl.register(device_id, ["lab"])
    created = ctl.api("POST", "/v1/rollouts", json=STAGED)
    assert created.status_code == 201, created.text
    rollout = created.json()
    assert (rollout["state"], rollout["wave"], rollout["waves"]) == ("running", 1, 2)
    assert [(d["device_id"], d["wave"], d["status"]) for d in rollout["devices"]] == [
        ("cam-1", 1, "pending"),
        ("cam-2", 2, "waiting"),
        ("cam-3", 2, "waiting"),
    ]
    assert rollout["plan"]["gates"]["max_error_rate"] == 0.05
    generations = {d["device_id"]: d["desired_generation"] for d in ctl.api("GET", "/v1/devices").json()}
    assert generations == {"cam-1": 1, "cam-2": 0, "cam-3": 0}

    conflict = ctl.api("POST", "/v1/rollouts", json={"model": "digits", "version": "1", "devices": ["cam-2"]})
    assert conflict.status_code == 409
    assert f"already in active rollout {rollout['id']} (running)" in conflict.json()["detail"]

    rid = rollout["id"]
    paused = ctl.api("POST", f"/v1/rollouts/{rid}/pause", json={"reason": "night freeze"}).json()
    assert (paused["state"], paused["status"], paused["reason"]) == (
        "paused",
        "in_progress",
        "operator: night freeze",
    )
    refused = ctl.api("POST", f"/v1/rollouts/{rid}/approve")
    assert refused.status_code == 409 and "it is paused" in refused.json()["detail"]
    assert ctl.api("POST", f"/v1/rollouts/{rid}/explode").status_code == 404
    assert ctl.api("POST", "/v1/rollouts/nope/pause").status_code == 404
    assert ctl.api("POST", f"/v1/rollouts/{rid}/rollback").json()["state"] == "rolled_back"
    events = ctl.api("GET", f"/v1/rollouts/{rid}/events").json()
    assert [(e["kind"], e["device_id"]) for e in events] == [
        ("created", ""),
        ("start_wave", ""),
        ("set_desired", "cam-1"),
        ("pause", ""),
        ("rollback", ""),
        ("revert_desired", "cam-1"),
        ("complete", ""),
    ]
    assert events[-1]["state"] == "rolled_back"
    generations = {d["device_id"]: d["desired_generation"] for d in ctl.api("GET", "/v1/devices").json()}
    assert generations == {"cam-1": 2, "cam-2": 0, "cam-3": 0}
    # The rollback freed the devices for the next rollout.
    assert ctl.api("POST", "/v1/rollouts", json=STAGED).status_code == 201


def test_cli_creates_a_staged_rollout_and_steers_it(
    broker: Broker, tmp_path: Path, digits_model: Path
) -> None:
    controller = Controller(
        tmp_path / "controller",
        broker.port,
        passwd_file=broker.passwd_file,
        reload_command=broker.reload_command,
    )
    controller.start()
    try:
        controller.cli("models", "upload", str(digits_model), "--name", "digits", "--version", "1")
        for device_id in ("cam-1", "cam-2"):
            controller.cli("devices", "register", device_id, "--tag", "lab")
        rollout = controller.cli(
            "rollouts", "create", "--model", "digits", "--version", "1", "--tag", "lab",
            "--wave", "50%:30", "--wave", "100%", "--max-error-rate", "0.1", "--max-latency-ratio", "2",
            "--on-failure", "rollback", "--manual-approval", "--device-timeout", "60",
        )  # fmt: skip
        plan = rollout["plan"]
        assert [(w["percent"], w["soak_s"]) for w in plan["waves"]] == [(50.0, 30.0), (100.0, 0.0)]
        assert (plan["gates"]["max_latency_ratio"], plan["failure_action"], plan["manual_approval"]) == (
            2.0,
            "rollback",
            True,
        )
        rid = rollout["id"]
        assert controller.cli("rollouts", "pause", rid, "--reason", "checking")["state"] == "paused"
        refused = controller.cli("rollouts", "resume", "nope", check=False)
        assert refused.returncode == 1 and "unknown rollout nope" in refused.stderr
        assert controller.cli("rollouts", "resume", rid)["state"] == "running"
        assert controller.cli("rollouts", "abort", rid)["state"] == "aborted"
        kinds = [e["kind"] for e in controller.cli("rollouts", "events", rid)]
        assert kinds[-4:] == ["pause", "resume", "abort", "complete"]
        assert [r["id"] for r in controller.cli("rollouts", "list")] == [rid]
        bad = controller.cli(
            "rollouts", "create", "--model", "digits", "--version", "1", "--all", "--wave", "x%", check=False
        )
        assert bad.returncode == 1 and "--wave 'x%'" in bad.stderr
        shadowed = controller.cli(
            "rollouts", "create", "--model", "digits", "--version", "1", "--tag", "lab",
            "--shadow-soak", "30", "--min-shadow-agreement", "0.95", "--min-shadow-compared", "100",
        )  # fmt: skip
        assert shadowed["plan"]["shadow"] == {
            "soak_s": 30.0,
            "min_agreement": 0.95,
            "max_deviation": None,
            "min_compared": 100,
        }
        assert shadowed["plan"]["device_timeout_s"] == 900
        # The first rollout stopped in its first wave: cam-2 has no model in the tenant for a
        # shadow candidate to run beside, so it is skipped, saying why.
        statuses = {d["device_id"]: d["status"] for d in shadowed["devices"]}
        assert statuses == {"cam-1": "shadow", "cam-2": "skipped"}
        kinds = [e["kind"] for e in controller.cli("rollouts", "events", shadowed["id"])]
        assert kinds == ["created", "start_wave", "set_shadow"]
        lonely = controller.cli(
            "rollouts", "create", "--model", "digits", "--version", "1", "--all", "--min-shadow-agreement", "0.9",
            check=False,
        )  # fmt: skip
        assert lonely.returncode == 1 and "need --shadow-soak" in lonely.stderr
        # Abort in the shadow phase takes the candidates back out of the shadow slot.
        # ("cleared" is read from each device's stored desired state.)
        aborted = controller.cli("rollouts", "abort", shadowed["id"])
        assert aborted["state"] == "aborted", aborted
        details = {d["device_id"]: d["detail"] for d in aborted["devices"]}
        assert details["cam-1"] == "rollout aborted: shadow candidate cleared; it never went live"
        assert "no model is live in tenant default" in details["cam-2"]
        kinds = [e["kind"] for e in controller.cli("rollouts", "events", shadowed["id"])]
        assert kinds[-3:] == ["abort", "revert_desired", "complete"]
    finally:
        controller.stop()
