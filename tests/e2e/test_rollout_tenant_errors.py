"""A tenant pipeline's inferences count for the model version that made them, and the gates judge
them: real controller, real mosquitto, three real agent processes.

Every device runs tenant ``meter`` fed by a CSV replay of 64-feature rows, and no app calls the
agents over gRPC. Version 1 takes those rows; version 2 wants 32 features, so it passes the
agent's staging smoke test (zeros of its own shape) and then fails every inference the tenant
makes. Version 1's inferences show in the telemetry under the model version and the tenant; a
staged rollout of version 2 is stopped at its first wave and rolled back, whether the
controller's error-rate gate, the agent's probation or, with a shadow phase, the error rate of
the candidate's own inferences in the shadow lane judges it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker
from tests.support.localfleet import Controller, register_agent, rollout_done
from tests.support.model_bytes import linear_model
from tests.support.rollout_fleet import classifier, digits_samples
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow

DEVICES = ("meter-0", "meter-1", "meter-2")


def tenant_toml(csv: Path) -> str:
    return f"""
[[tenants]]
id = "meter"
model = "clf"
rate_hz = 20
queue = 8
results = ["mqtt"]
[tenants.source]
kind = "csv"
uri = "{csv}"
loop = true
"""


def telemetry_models(
    controller: Controller, device_id: str, version: str, tenant: str = "meter"
) -> list[dict[str, Any]]:
    rows = controller.api("GET", f"/v1/devices/{device_id}/telemetry", params={"limit": 200}).json()
    return [
        m
        for r in rows
        for m in r["models"]
        if (m["tenant"], m["model_name"], m["model_version"]) == (tenant, "clf", version)
    ]


def summed(models: list[dict[str, Any]], *fields: str) -> tuple[int, ...]:
    return tuple(sum(m[f] for m in models) for f in fields)


def active_version(controller: Controller, device_id: str) -> str | None:
    reported = controller.api("GET", f"/v1/devices/{device_id}").json().get("reported") or {}
    return next(
        (
            m["model_version"]
            for m in reported.get("models", [])
            if m["tenant"] == "meter" and m["phase"] == "active"
        ),
        None,
    )


ERROR_GATE = ("--max-error-rate", "0.02", "--min-inferences", "10")


@pytest.mark.parametrize(
    ("gate", "reason", "origin"),
    [
        (ERROR_GATE, "error rate", "pipeline"),
        (("--probation", "60", "--probation-max-error-rate", "0.02"), "failed to update", "pipeline"),
        # The shadow soak is long: only the error rate can end the phase within the test's wait.
        ((*ERROR_GATE, "--shadow-soak", "600"), "shadow: error rate", "shadow"),
    ],
    ids=["controller-gate", "agent-probation", "shadow-lane"],
)
def test_a_version_failing_every_tenant_inference_is_stopped_at_the_first_wave_and_rolled_back(
    broker: Broker,
    controller: Controller,
    agents: list[AgentProcess],
    tmp_path: Path,
    gate: tuple[str, ...],
    reason: str,
    origin: str,
) -> None:
    csv = tmp_path / "meter.csv"
    np.savetxt(csv, digits_samples()[:200], delimiter=",", fmt="%g")
    v1 = tmp_path / "v1.onnx"
    classifier(v1, seed=1)
    v2 = tmp_path / "v2.onnx"
    v2.write_bytes(linear_model(2, n_in=32, n_out=10))
    controller.cli("models", "upload", str(v1), "--name", "clf", "--version", "1")
    controller.cli("models", "upload", str(v2), "--name", "clf", "--version", "2")
    for device_id in DEVICES:
        agent = register_agent(controller, tmp_path / "agents", device_id, telemetry_interval=0.5)
        with agent.config.open("a") as f:
            f.write(tenant_toml(csv))
        agents.append(agent.start())

    first = controller.cli(
        "rollouts", "create", "--model", "clf", "--version", "1", "--all", "--tenant", "meter"
    )
    done = wait_until(lambda: rollout_done(controller, first["id"]), 120, "version 1 on every device")
    assert done["status"] == "succeeded", done

    # Only the pipeline feeds version 1, and its telemetry says so, under the model and the tenant.
    def pipeline_inferences(device_id: str) -> bool:
        return summed(telemetry_models(controller, device_id, "1"), "pipeline_inferences")[0] >= 20

    for device_id in DEVICES:
        wait_until(
            lambda: pipeline_inferences(device_id),  # noqa: B023 - called before the loop moves on
            60,
            f"{device_id}: pipeline inferences of version 1 in its telemetry",
        )
        models = telemetry_models(controller, device_id, "1")
        n, errors, pipeline, grpc_calls = summed(
            models, "inference_count", "error_count", "pipeline_inferences", "grpc_inferences"
        )
        assert (errors, grpc_calls, pipeline) == (0, 0, n), models

    # The first wave soaks long enough for its telemetry to arrive on a busy machine; the gates
    # are judged continuously, so a failing version is stopped long before the soak ends.
    staged = controller.cli(
        "rollouts", "create", "--model", "clf", "--version", "2", "--all", "--tenant", "meter",
        "--wave", "1:20", "--wave", "100%:2", *gate,
        "--on-failure", "rollback", "--device-timeout", "60",
    )  # fmt: skip
    rid = staged["id"]

    def finished() -> dict[str, Any] | None:
        r: dict[str, Any] = controller.api("GET", f"/v1/rollouts/{rid}").json()
        return r if r["state"] not in ("running", "rolling_back", "paused", "awaiting_approval") else None

    final = wait_until(finished, 120, "the staged rollout of version 2 to finish")
    events = controller.api("GET", f"/v1/rollouts/{rid}/events").json()
    assert final["state"] == "rolled_back", (final, events)
    assert final["reason"].startswith("wave 1 of 2") and reason in final["reason"], final["reason"]
    assert [e["wave"] for e in events if e["kind"] == "start_wave"] == [1]
    [tried] = [d["device_id"] for d in final["devices"] if d["wave"] == 1]
    assert {d["status"] for d in final["devices"] if d["wave"] > 1} == {"waiting"}

    # The failures are in the telemetry under version 2 and the tenant it ran for: the tenant's
    # pipeline, or the shadow lane beside it (tenant meter.shadow), where version 2 never served.
    tenant = "meter.shadow" if origin == "shadow" else "meter"

    def failures_reported() -> tuple[int, ...] | None:
        counted = summed(
            telemetry_models(controller, tried, "2", tenant),
            "inference_count",
            "error_count",
            f"{origin}_errors",
        )
        return counted if counted[0] else None

    n, errors, origin_errors = wait_until(failures_reported, 30, f"{tried}: version 2 in its telemetry")
    assert errors == origin_errors == n > 0
    wait_until(lambda: active_version(controller, tried) == "1", 60, f"{tried} back on version 1")
    assert [active_version(controller, d) for d in DEVICES] == ["1", "1", "1"]
