"""The shadow gate on real agents: before each wave goes live its devices run the
candidate as the tenant's shadow beside the live model on the same CSV replay, and the rollout
engine judges the agreement they report.

A candidate trained on permuted labels disagrees with the live model: it is stopped in the first
wave's shadow phase and never serves; a retrained candidate agrees, passes both waves' shadow
gates and goes live everywhere, through a controller killed in its shadow phase.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.agent_process import AgentProcess
from tests.support.broker import Broker
from tests.support.localfleet import Controller, register_agent
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow

TOKEN = "replay-app-token-0123456789"
DEVICES = ("shadow-0", "shadow-1")


def digits_model(path: Path, permute: bool = False, max_iter: int = 300) -> tuple[Path, np.ndarray]:
    """Logistic regression on scikit-learn's bundled digits as ONNX; ``permute`` shifts every label
    by one (a model that is confident and wrong), returns the held-out rows too."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    labels = (y[:1500] + 1) % 10 if permute else y[:1500]
    model = LogisticRegression(max_iter=max_iter).fit(x[:1500], labels)
    onx = to_onnx(model, x[:1], options={id(model): {"zipmap": False}}, target_opset=17)
    path.write_bytes(onx.SerializeToString())
    return path, x[1500:1600]


def tenant_toml(csv: Path) -> str:
    return f"""
[[tenants]]
id = "replay"
model = "digits"
token = "{TOKEN}"
rate_hz = 25
queue = 8
results = ["grpc"]
[tenants.source]
kind = "csv"
uri = "{csv}"
loop = true
[tenants.preprocess]
dtype = "float32"
"""


def create(controller: Controller, version: str) -> str:
    created = controller.cli(
        "rollouts", "create", "--model", "digits", "--version", version, "--tenant", "replay", "--all",
        "--wave", "1", "--wave", "100%", "--shadow-soak", "3", "--min-shadow-agreement", "0.9",
        "--min-shadow-compared", "20", "--on-failure", "rollback", "--device-timeout", "60",
    )  # fmt: skip
    return str(created["id"])


def finished(controller: Controller, rollout_id: str, timeout: float) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        r: dict[str, Any] = controller.api("GET", f"/v1/rollouts/{rollout_id}").json()
        return r if r["state"] not in ("running", "rolling_back", "paused", "awaiting_approval") else None

    try:
        return wait_until(done, timeout, f"rollout {rollout_id} to finish")
    except TimeoutError:
        raise AssertionError(f"rollout did not finish: {events(controller, rollout_id)}") from None


def events(controller: Controller, rollout_id: str) -> list[dict[str, Any]]:
    body: list[dict[str, Any]] = controller.api("GET", f"/v1/rollouts/{rollout_id}/events").json()
    return body


def tenants_of(controller: Controller, device: str) -> dict[str, tuple[str, str]]:
    """tenant -> (model version, phase) from the device's reported state."""
    d = controller.api("GET", f"/v1/devices/{device}").json()
    return {
        m["tenant"]: (m["model_version"], m["phase"]) for m in (d.get("reported") or {}).get("models", [])
    }


def live_versions(controller: Controller, device: str, limit: int = 200) -> set[str]:
    windows = controller.api("GET", f"/v1/devices/{device}/telemetry", params={"limit": limit}).json()
    return {m["model_version"] for w in windows for m in w["models"] if m["tenant"] == "replay"}


def shadow_agreement(controller: Controller, device: str, version: str) -> float | None:
    windows = controller.api("GET", f"/v1/devices/{device}/telemetry", params={"limit": 200}).json()
    stats = [
        s for w in windows for s in w["shadows"] if s["candidate_model_version"] == version and s["compared"]
    ]
    if not stats:
        return None
    return float(sum(s["top1_agreement"] * s["compared"] for s in stats) / sum(s["compared"] for s in stats))


def test_shadow_gate_stops_a_disagreeing_candidate_and_lets_an_agreeing_one_go_live(
    broker: Broker, controller: Controller, agents: list[AgentProcess], tmp_path: Path
) -> None:
    v1, rows = digits_model(tmp_path / "v1.onnx")
    v2, _ = digits_model(tmp_path / "v2.onnx", max_iter=200)
    v3, _ = digits_model(tmp_path / "v3.onnx", permute=True)
    for path, version in ((v1, "1"), (v2, "2"), (v3, "3")):
        controller.cli("models", "upload", str(path), "--name", "digits", "--version", version)
    csv = tmp_path / "rows.csv"
    np.savetxt(csv, rows, delimiter=",", fmt="%g")
    for device in DEVICES:
        agent = register_agent(controller, tmp_path / "agents", device, telemetry_interval=0.5)
        with agent.config.open("a") as f:
            f.write(tenant_toml(csv))
        agents.append(agent.start())

    first = controller.cli(
        "rollouts", "create", "--model", "digits", "--version", "1", "--tenant", "replay", "--all"
    )
    done = finished(controller, first["id"], 90)
    assert done["state"] == "succeeded", done

    # The candidate trained on shifted labels: stopped in the first wave's shadow phase.
    bad = create(controller, "3")
    final = finished(controller, bad, 60)
    assert final["state"] == "rolled_back", final
    assert final["reason"].startswith("wave 1 of 2: shadow gate: top-1 agreement with the live model"), final
    log = events(controller, bad)
    kinds = [e["kind"] for e in log]
    assert "set_desired" not in kinds and "go_live" not in kinds, log
    assert [e["device_id"] for e in log if e["kind"] == "set_shadow"] == [DEVICES[0]]
    assert [e["device_id"] for e in log if e["kind"] == "revert_desired"] == [DEVICES[0]]
    agreement = shadow_agreement(controller, DEVICES[0], "3")
    assert agreement is not None and agreement < 0.5, agreement
    # Nothing went live: the shadow slot is emptied and version 3 never served the tenant.
    wait_until(lambda: "replay.shadow" not in tenants_of(controller, DEVICES[0]), 30, "shadow cleared")
    for device in DEVICES:
        assert tenants_of(controller, device)["replay"] == ("1", "active")
        assert "3" not in live_versions(controller, device)
    assert {d["status"] for d in final["devices"]} == {"rolled_back", "waiting"}

    # The retrained candidate agrees with the live model: each wave's shadow gate passes, it goes live.
    # The controller is killed in the first wave's shadow phase and resumes from its database.
    good = create(controller, "2")
    wait_until(
        lambda: any(e["kind"] == "set_shadow" for e in events(controller, good)), 30, "the first shadow set"
    )
    controller.stop(signal.SIGKILL)
    controller.start()
    final = finished(controller, good, 90)
    assert (final["state"], final["status"]) == ("succeeded", "succeeded"), final
    log = events(controller, good)
    assert [e["wave"] for e in log if e["kind"] == "go_live"] == [1, 2]
    assert all("shadow gate passed" in e["reason"] for e in log if e["kind"] == "go_live")
    for device in DEVICES:
        kinds = [e["kind"] for e in log if e["device_id"] == device]
        assert kinds == ["set_shadow", "set_desired"], (device, log)
        wait_until(
            lambda d=device: tenants_of(controller, d) == {"replay": ("2", "active")},  # type: ignore[misc]
            30,
            f"{device} on version 2 with the shadow slot cleared",
        )
        assert (shadow_agreement(controller, device, "2") or 0.0) >= 0.9
